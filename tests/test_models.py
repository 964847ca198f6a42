"""llmcore.models against transformers: logits (atol 1e-4 fp32), gradients, packed == padded,
save_pretrained round trips, and the errors users hit with wrong checkpoints."""
from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch

import llmcore
from llmcore.models import (CheckpointError, DecoderConfig, EncoderConfig, EncoderForSequenceClassification,
                            UnsupportedModelError, from_pretrained, save_pretrained)
from model_pairs import causal_lm_pair
from tokenizer_refs import corpus, minilm_dir

transformers = pytest.importorskip("transformers")

ATOL = 1e-4


@pytest.fixture(scope="module")
def minilm():
    """(llmcore model, transformers model) on the real MiniLM weights with the same seeded head."""
    torch.manual_seed(0)
    ref = transformers.BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2,
                                                                     attn_implementation="sdpa")
    ours = from_pretrained(minilm_dir(), num_labels=2)
    assert ours.newly_initialized == ["head.out.weight", "head.out.bias"]
    with torch.no_grad():
        ours.head.out.weight.copy_(ref.classifier.weight)
        ours.head.out.bias.copy_(ref.classifier.bias)
    return ours, ref


@pytest.fixture(scope="module")
def sst2_batch():
    tok = llmcore.Tokenizer.from_pretrained(minilm_dir())
    texts = list(corpus("sst2-test")[:24])
    padded, packed = tok.encode_batch(texts, padding=True), tok.encode_batch(texts)
    t = lambda a: torch.from_numpy(a).long()  # noqa: E731
    return (dict(input_ids=t(padded.input_ids), attention_mask=t(padded.attention_mask),
                 token_type_ids=t(padded.token_type_ids)),
            dict(input_ids=t(packed.input_ids), token_type_ids=t(packed.token_type_ids),
                 cu_seqlens=torch.from_numpy(packed.cu_seqlens)))


def test_minilm_logits_and_gradients_match_transformers(minilm, sst2_batch):
    ours, ref = minilm
    padded, _ = sst2_batch
    ours.eval(), ref.eval()
    labels = torch.arange(len(padded["input_ids"])) % 2
    a = ref(**padded, labels=labels)
    b = ours(**padded, labels=labels)
    torch.testing.assert_close(b.logits, a.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(b.loss, a.loss, atol=ATOL, rtol=0)
    ref.zero_grad(), ours.zero_grad()
    a.loss.backward(), b.loss.backward()
    pairs = [(ours.embed.word.weight, ref.bert.embeddings.word_embeddings.weight),
             (ours.layers[0].attn.q.weight, ref.bert.encoder.layer[0].attention.self.query.weight),
             (ours.layers[3].mlp.fc1.bias, ref.bert.encoder.layer[3].intermediate.dense.bias),
             (ours.layers[5].mlp_norm.weight, ref.bert.encoder.layer[5].output.LayerNorm.weight),
             (ours.head.hidden.weight, ref.bert.pooler.dense.weight), (ours.head.out.weight, ref.classifier.weight)]
    for mine, theirs in pairs:
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-4, rtol=1e-3)


def test_minilm_packed_equals_padded(minilm, sst2_batch):
    ours, _ = minilm
    ours.eval()
    padded, packed = sst2_batch
    with torch.no_grad():
        torch.testing.assert_close(ours(**packed).logits, ours(**padded).logits, atol=1e-5, rtol=0)


def test_minilm_bf16_autocast_close(minilm, sst2_batch):
    ours, ref = minilm
    padded, packed = sst2_batch
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = ref.eval()(**padded).logits.float()
        b = ours.eval()(**padded).logits.float()
        c = ours(**packed).logits.float()
    assert (a - b).abs().max() < 0.05 and (b - c).abs().max() < 0.05


DECODERS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=101, n_embd=64, n_layer=2, n_head=4, n_positions=64),
    "llama": lambda: transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64),
    "qwen2": lambda: transformers.Qwen2Config(vocab_size=101, hidden_size=64, intermediate_size=96,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64),
    # head_dim 24 (not hidden / heads = 16), as Qwen3's checkpoints set it apart from the hidden size
    "qwen3": lambda: transformers.Qwen3Config(vocab_size=101, hidden_size=64, intermediate_size=96,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=24, max_position_embeddings=64),
}


@pytest.fixture(scope="module", params=sorted(DECODERS))
def decoder(request, tmp_path_factory):
    return causal_lm_pair(DECODERS[request.param](), tmp_path_factory.mktemp(request.param))


def test_decoder_logits_loss_and_gradients_match(decoder):
    ours, ref, _ = decoder
    ours.eval(), ref.eval()
    torch.manual_seed(1)
    ids = torch.randint(0, 101, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    a = ref(input_ids=ids, attention_mask=mask, labels=labels)
    b = ours(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    torch.testing.assert_close(b.logits[real], a.logits[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(b.loss, a.loss, atol=ATOL, rtol=0)
    ref.zero_grad(), ours.zero_grad()
    a.loss.backward(), b.loss.backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    theirs = dict(ref.named_parameters())
    emb = "transformer.wte.weight" if "transformer.wte.weight" in theirs else "model.embed_tokens.weight"
    torch.testing.assert_close(ours_grads["embed.word.weight"], theirs[emb].grad, atol=1e-4, rtol=1e-3)
    last = ours.config.num_layers - 1
    q_ref = [p for n, p in theirs.items() if f".{last}." in n and ("q_proj.weight" in n or "c_attn.weight" in n)][0]
    rows = ours.layers[last].attn.q.weight.shape[0]
    q_grad = q_ref.grad.t()[:rows] if ours.config.family == "gpt2" else q_ref.grad  # GPT-2: fused Conv1D qkv
    torch.testing.assert_close(ours_grads[f"layers.{last}.attn.q.weight"], q_grad, atol=1e-4, rtol=1e-3)


def test_qwen3_head_norms(tmp_path):
    """Qwen3's per-head RMSNorms of q and k (distinct random weights, so that swapped or unapplied norms show):
    logits and the norms' gradients equal transformers'."""
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(DECODERS["qwen3"](), attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "_norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, task="causal-lm").eval()
    ids = torch.randint(0, 101, (2, 11))
    a, b = ref(input_ids=ids, labels=ids), ours(ids, labels=ids)
    torch.testing.assert_close(b.logits, a.logits, atol=ATOL, rtol=0)
    a.loss.backward(), b.loss.backward()
    for kind in ("q", "k"):
        torch.testing.assert_close(ours.layers[1].attn.get_submodule(f"{kind}_norm").weight.grad,
                                   ref.model.layers[1].self_attn.get_submodule(f"{kind}_norm").weight.grad,
                                   atol=1e-4, rtol=1e-3)


def test_decoder_packed_equals_padded(decoder):
    ours, _, _ = decoder
    ours.eval()
    torch.manual_seed(2)
    seqs = [torch.randint(0, 101, (n,)) for n in (5, 17, 1, 9)]
    cu = torch.tensor([0, 5, 22, 23, 32], dtype=torch.int32)
    with torch.no_grad():
        packed = ours(torch.cat(seqs), cu_seqlens=cu).logits
        for s, start in zip(seqs, cu[:-1].tolist()):
            alone = ours(s[None]).logits[0]
            torch.testing.assert_close(packed[start:start + len(s)], alone, atol=1e-5, rtol=0)
        labels = torch.cat(seqs)
        loss_packed = ours(torch.cat(seqs), cu_seqlens=cu, labels=labels).loss
        per_seq = [ours(s[None], labels=s[None]) for s in seqs]
        counts = torch.tensor([len(s) - 1 for s in seqs], dtype=torch.float)
        want = sum(o.loss * c for o, c in zip(per_seq, counts) if c > 0) / counts.sum()
        torch.testing.assert_close(loss_packed, want, atol=1e-5, rtol=0)


def _restarting_positions(lengths_per_row):
    """position_ids of rows each holding several sequences (DataCollatorWithFlattening's layout)."""
    return torch.tensor([[i for n in row for i in range(n)] for row in lengths_per_row])


def test_decoder_rows_of_packed_sequences_as_transformers_reads_them(decoder):
    """Rows whose position_ids restart, with no attention_mask: transformers 5 (without a KV cache) lets each
    sequence attend to itself only, and shifts the labels along the row; llmcore let them attend across the
    restart (a probe: logits 0.6-0.97 off)."""
    ours, ref, _ = decoder
    ours.eval(), ref.eval()
    torch.manual_seed(3)
    pos = _restarting_positions([[5, 7, 4], [9, 1, 6]])
    ids = torch.randint(0, 101, pos.shape)
    labels = ids.clone()
    labels[0, 5] = -100  # (the collator's -100 at a sequence's first token; the others as they are)
    a = ref(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)
    b = ours(ids, position_ids=pos, labels=labels)
    torch.testing.assert_close(b.logits, a.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(b.loss, a.loss, atol=ATOL, rtol=0)
    plain = torch.arange(ids.shape[1])[None].expand(ids.shape)  # (no restart: one sequence a row, as before)
    torch.testing.assert_close(ours(ids, position_ids=plain).logits, ours(ids).logits, atol=0, rtol=0)


def test_encoder_rows_of_packed_sequences_as_transformers_reads_them(minilm):
    """The same for the classifier on MiniLM: each packed sequence attends to itself, a row's logits are its first
    sequence's ([CLS] of the row), as transformers' BERT reads such rows (a probe: 40% off)."""
    ours, ref = minilm
    ours.eval(), ref.eval()
    ids = torch.tensor([[101, 2023, 2003, 102, 101, 2062, 3231, 2182, 102],
                        [101, 2307, 3185, 999, 102, 101, 2919, 102, 0]])
    pos = _restarting_positions([[4, 5], [5, 3, 1]])
    types = torch.zeros_like(ids)
    with torch.no_grad():
        a = ref(input_ids=ids, position_ids=pos, token_type_ids=types, labels=torch.tensor([1, 0]))
        b = ours(ids, position_ids=pos, token_type_ids=types, labels=torch.tensor([1, 0]))
        alone = ours(ids[:1, :4]).logits
    torch.testing.assert_close(b.logits, a.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(b.loss, a.loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(b.logits[:1], alone, atol=ATOL, rtol=0)  # (the first sequence, as if alone)


def test_save_pretrained_round_trips_through_transformers(decoder, minilm, tmp_path, sst2_batch):
    ours, _, _ = decoder
    save_pretrained(ours, tmp_path / "dec")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dec").eval()
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ours.eval()(ids).logits, atol=ATOL, rtol=0)
    enc, _ = minilm
    enc.save_pretrained(tmp_path / "enc")
    bert = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "enc").eval()
    padded, _ = sst2_batch
    with torch.no_grad():
        torch.testing.assert_close(bert(**padded).logits, enc.eval()(**padded).logits, atol=ATOL, rtol=0)
    again = from_pretrained(tmp_path / "enc")
    assert again.newly_initialized == []


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_other_encoder_families(family, tmp_path):
    torch.manual_seed(0)
    if family == "roberta":
        cfg = transformers.RobertaConfig(vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=40, num_labels=3)
        ref = transformers.RobertaForSequenceClassification(cfg)
    else:
        cfg = transformers.DistilBertConfig(vocab_size=99, dim=48, n_layers=2, n_heads=4, hidden_dim=64,
                                            max_position_embeddings=40, num_labels=3)
        ref = transformers.DistilBertForSequenceClassification(cfg)
    ref.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert ours.newly_initialized == []
    ids = torch.randint(3, 99, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = cfg.pad_token_id
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids, attention_mask=mask).logits,
                                   ref.eval()(input_ids=ids, attention_mask=mask).logits, atol=ATOL, rtol=0)
        packed = ours(torch.cat([ids[0], ids[1, :7]]), cu_seqlens=torch.tensor([0, 11, 18], dtype=torch.int32))
        torch.testing.assert_close(packed.logits, ours(ids, attention_mask=mask).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", [{"activation_function": "gelu"}, {"activation_function": "gelu_pytorch_tanh"},
                                     {"scale_attn_by_inverse_layer_idx": True}, {"scale_attn_weights": False},
                                     {"tie_word_embeddings": False}])
def test_gpt2_config_variants_match_transformers(variant, tmp_path):
    """GPT-2's activation, attention scaling and untied head: llmcore read none of them (relu logits 1.0 off; an
    untied head failed to load as 'missing'); logits, loss, gradients and the saved checkpoint match transformers."""
    cfg = transformers.GPT2Config(vocab_size=101, n_embd=32, n_layer=3, n_head=4, n_positions=32, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2, **variant)
    ours, ref, _ = causal_lm_pair(cfg, tmp_path / "ckpt")
    ours.eval(), ref.eval()
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))
    a, b = ref(input_ids=ids, labels=ids), ours(ids, labels=ids)
    torch.testing.assert_close(b.logits, a.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(b.loss, a.loss, atol=ATOL, rtol=0)
    a.loss.backward(), b.loss.backward()
    torch.testing.assert_close(ours.embed.word.weight.grad, ref.transformer.wte.weight.grad, atol=1e-4, rtol=1e-3)
    ours.save_pretrained(tmp_path / "back")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, a.logits, atol=ATOL, rtol=0)


def test_gpt2_dropouts_and_biases_are_gpt2s(tmp_path):
    """GPT-2's embd_pdrop was read as resid_pdrop (0.9 on the embeddings trained with none), and a GPT-2 built from
    DecoderConfig had no q/k/v biases, so save_pretrained failed with a bare KeyError (a probe). The three dropouts
    now land where transformers puts them and survive a save; GPT-2 without biases is refused by name."""
    from llmcore.models import DecoderConfig, DecoderForCausalLM

    cfg = transformers.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                                  embd_pdrop=0.9, attn_pdrop=0.25)
    ours, _, _ = causal_lm_pair(cfg, tmp_path / "ckpt")
    assert ours.dropout.p == 0.9 and ours.layers[0].dropout.p == 0.0
    assert ours.config.dropout == 0.0 and ours.config.attention_dropout == 0.25
    ours.train()
    ids = torch.randint(0, 101, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not torch.equal(ours(ids).logits, ours(ids).logits)  # the embeddings' dropout is on
    ours.save_pretrained(tmp_path / "back")
    saved = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (saved["embd_pdrop"], saved["resid_pdrop"], saved["attn_pdrop"]) == (0.9, 0.0, 0.25)

    built = DecoderForCausalLM(DecoderConfig(family="gpt2", vocab_size=60, hidden_size=32, num_layers=1, num_heads=4,
                                             num_kv_heads=4, head_dim=8, intermediate_size=48,
                                             max_position_embeddings=16, dropout=0.1, embedding_dropout=0.3))
    assert built.config.attention_bias and built.layers[0].attn.q.bias is not None and built.dropout.p == 0.3
    built.save_pretrained(tmp_path / "built")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "built")
    assert (theirs.config.embd_pdrop, theirs.config.resid_pdrop) == (0.3, 0.1)
    with pytest.raises(ValueError, match="attention_bias=False: GPT-2"):
        DecoderConfig(family="gpt2", attention_bias=False)
    assert DecoderConfig(family="qwen2").attention_bias and not DecoderConfig(family="llama").attention_bias


@pytest.mark.parametrize("kind", ["BertForQuestionAnswering", "RobertaForTokenClassification",
                                  "RobertaForMultipleChoice", "LlamaForSequenceClassification"])
def test_another_tasks_head_is_left_unused(kind, tmp_path, capsys):
    """A checkpoint of another task (a SQuAD-tuned BERT's qa_outputs, a token classifier, a classifier's score
    for a causal LM) was refused for its head's tensors ("unexpected tensors"): transformers loads the body and
    leaves that head unused, saying so; so does llmcore now. Tensors llmcore does not know inside the body stay
    an error."""
    from safetensors.torch import load_file, save_file

    cls = getattr(transformers, kind)
    if kind.startswith("Llama"):
        cfg, task, prefix = DECODERS["llama"](), "causal-lm", "model."
        cfg.tie_word_embeddings = True  # (an untied LM head is missing from it: an error, a head is never guessed)
    else:
        family = "roberta" if kind.startswith("Roberta") else "bert"
        cfg = transformers.AutoConfig.for_model(family, vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=4, intermediate_size=48,
                                                max_position_embeddings=40)
        task, prefix = "sequence-classification", family + "."
    torch.manual_seed(0)
    cls(cfg).save_pretrained(tmp_path)
    theirs = load_file(str(tmp_path / "model.safetensors"))
    ours = from_pretrained(tmp_path, task=task)
    assert "are another task's head" in capsys.readouterr().err
    q = prefix + ("layers.0.self_attn.q_proj.weight" if task == "causal-lm" else
                  "encoder.layer.0.attention.self.query.weight")
    assert torch.equal(ours.layers[0].attn.q.weight, theirs[q])
    save_file({**theirs, prefix + "encoder.extra.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        from_pretrained(tmp_path, task=task)


@pytest.mark.parametrize("family, over", [("qwen2", {"mlp_bias": True}), ("qwen3", {"mlp_bias": True}),
                                          ("llama", {"hidden_act": "swish"})])
def test_config_fields_transformers_ignores_or_aliases_load(family, over, tmp_path):
    """mlp_bias=True in a Qwen2 / Qwen3 config (their transformers MLPs have no biases whatever it says) and
    hidden_act "swish" (transformers' SiLU) were refused; they load, with transformers' logits."""
    cfg = DECODERS[family]()
    for key, value in over.items():
        setattr(cfg, key, value)
    ours, ref, _ = causal_lm_pair(cfg, tmp_path)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, ref.eval()(input_ids=ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family, over, field", [
    ("gpt2", {"activation_function": "relu"}, "activation_function 'relu'"),
    ("bert", {"is_decoder": True}, "is_decoder=True"),
    ("bert", {"add_cross_attention": True}, "add_cross_attention=True"),
    ("bert", {"hidden_act": "relu"}, "hidden_act 'relu'"),
    ("llama", {"mlp_bias": True}, "mlp_bias=True"),
    ("bert", {"problem_type": "ranking"}, "problem_type 'ranking'"),
])
def test_configs_llmcore_does_not_compute_are_refused_by_field(family, over, field):
    """A config field whose value llmcore's models would not compute as transformers does is an
    UnsupportedModelError naming it (llmcore finetune then trains transformers' model), never a silent difference
    (BERT's is_decoder ran bidirectionally; GPT-2's activation was ignored; BERT's relu was a plain ValueError)."""
    from llmcore.models.config import config_from_hf

    base = {"gpt2": transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2),
            "bert": transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=32),
            "llama": transformers.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=32)}[family].to_dict()
    task = "sequence-classification" if family == "bert" else "causal-lm"
    config_from_hf(base, task)
    with pytest.raises(UnsupportedModelError, match=field):
        config_from_hf({**base, **over}, task)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_encoder_drops_out_where_transformers_does(family, tmp_path):
    """Hidden dropout sits where transformers' has it: BERT and RoBERTa on the attention and MLP outputs,
    DistilBERT on the MLP's only (llmcore dropped its attention output too: more regularization than transformers
    in training, silently). With the MLP's output zeroed and the embedding and head dropouts off, the training
    forward equals the eval one exactly where no dropout is left (DistilBERT) and differs where one is."""
    if family == "distilbert":
        cfg = transformers.DistilBertConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, hidden_dim=48, dropout=0.5,
                                            attention_dropout=0.0)
    else:
        cls = transformers.BertConfig if family == "bert" else transformers.RobertaConfig
        cfg = cls(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=20, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path)
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    with torch.no_grad():
        for layer in ours.layers:
            layer.mlp.fc2.weight.zero_(), layer.mlp.fc2.bias.zero_()
        for name, m in ref.named_modules():
            if name.endswith(("ffn.lin2", "output.dense")) and "attention" not in name:
                m.weight.zero_(), m.bias.zero_()
    for model in (ours, ref):
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Dropout) and ("embed" in name or "layer" not in name):
                m.p = 0.0  # embeddings' and the head's
    ids = torch.randint(5, 97, (2, 9), generator=torch.Generator().manual_seed(1))

    def unchanged_in_training(model):
        with torch.no_grad():
            return torch.equal(model.train()(ids).logits, model.eval()(ids).logits)

    assert unchanged_in_training(ours) == unchanged_in_training(ref) == (family == "distilbert")


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("problem, labels", [
    ("multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])),
    ("regression", torch.tensor([[0.3, -1.2, 2.0], [2.0, 0.5, -0.1]])),
    (None, torch.tensor([2, 0])),  # integer labels: single-label
    (None, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])),  # float labels of every class: multi-label
])
def test_encoder_loss_follows_problem_type(family, problem, labels, tmp_path):
    """transformers' problem_type (set, or inferred from the labels as its forward does): multi-label and
    multi-output regression losses equal transformers' (both crashed in cross_entropy)."""
    over = {"num_labels": 3, "problem_type": problem}
    if family == "distilbert":
        cfg = transformers.DistilBertConfig(vocab_size=97, dim=32, n_layers=1, n_heads=4, hidden_dim=48, **over)
    else:
        cls = transformers.BertConfig if family == "bert" else transformers.RobertaConfig
        cfg = cls(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=20, **over)
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path)
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ours = from_pretrained(tmp_path).eval()
    ids = torch.randint(5, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss,
                               atol=1e-6, rtol=1e-5)


def test_roberta_position_pad_row_gets_no_gradient(tmp_path):
    """RoBERTa's position table has padding_idx = pad id, as its word table: a left-padded row's pad positions
    add no gradient there (llmcore's got one); every gradient equals transformers'."""
    cfg = transformers.RobertaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=20, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    torch.manual_seed(0)
    transformers.RobertaForSequenceClassification(cfg).save_pretrained(tmp_path)
    ref = transformers.RobertaForSequenceClassification.from_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    ids = torch.tensor([[1, 1, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])  # row 0 left-padded (pad id 1)
    mask, y = (ids != 1).long(), torch.tensor([0, 1])
    ref(input_ids=ids, attention_mask=mask, labels=y).loss.backward()
    ours(ids, attention_mask=mask, labels=y).loss.backward()
    theirs = ref.roberta.embeddings.position_embeddings.weight.grad
    assert theirs[1].abs().max() == 0 and ours.embed.position.weight.grad[1].abs().max() == 0
    torch.testing.assert_close(ours.embed.position.weight.grad, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", sorted(DECODERS))
def test_decoder_pad_row_gradient_as_transformers(family, tied, tmp_path):
    """The Llama-family classes build their word embedding with padding_idx = pad_token_id: that row gets no
    gradient from the lookup (an untied one none at all) when the pad id is a real token (pad = eos) or the last
    pad position of a left-padded row predicts the first real token. llmcore's had no padding row (a probe found
    the row's gradient 2.05 where transformers' is 0). GPT-2's has none, in both."""
    cfg = DECODERS[family]()
    cfg.pad_token_id, cfg.tie_word_embeddings = 3, tied
    ours, ref, _ = causal_lm_pair(cfg, tmp_path)
    ours.eval(), ref.eval()
    ids = torch.randint(4, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    ids[0, 5] = ids[1, :4] = 3  # a pad id inside a row (pad = eos), and a left-padded row
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ours(ids, attention_mask=mask, labels=labels).loss.backward()
    theirs = dict(ref.named_parameters())
    theirs = theirs.get("transformer.wte.weight", theirs.get("model.embed_tokens.weight")).grad
    if family != "gpt2" and not tied:
        assert theirs[3].abs().max() == 0
    torch.testing.assert_close(ours.embed.word.weight.grad, theirs, atol=1e-5, rtol=1e-4)


def test_decoder_pad_token_id_checked():
    small = dict(vocab_size=101, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=8,
                 intermediate_size=48)
    assert DecoderConfig(pad_token_id=-1, **small).pad_token_id == -1  # (torch's padding_idx: the last row)
    with pytest.raises(ValueError, match="pad_token_id 101 is not an id of the vocabulary"):
        DecoderConfig(pad_token_id=101, **small)
    with pytest.raises(ValueError, match="GPT-2's word embedding has no padding row"):
        DecoderConfig(family="gpt2", pad_token_id=0, **small)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_sliding_window_only_where_layers_slide(family, tmp_path):
    """use_sliding_window with max_window_layers covering every layer (layer_types all full): no layer slides in
    transformers, and llmcore runs sequences longer than the window (it refused them); where a layer slides,
    longer sequences are still refused."""
    cls = transformers.Qwen2Config if family == "qwen2" else transformers.Qwen3Config
    common = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, use_sliding_window=True, sliding_window=6)
    ours, ref, folder = causal_lm_pair(cls(max_window_layers=2, **common), tmp_path / "full")
    assert ref.config.layer_types == ["full_attention"] * 2
    ids = torch.randint(0, 101, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, ref.eval()(input_ids=ids).logits, atol=ATOL, rtol=0)
    sliding, _, _ = causal_lm_pair(cls(max_window_layers=1, **common), tmp_path / "sliding")
    with pytest.raises(ValueError, match=r"longer than the sliding window \(6\)"):
        sliding(ids)


def test_config_readings_as_transformers_reads_them(tmp_path):
    """Read as transformers 5 reads them (each silently computed otherwise; found by a probe): a tied decoder whose
    file holds an lm_head of other values uses that head, untied (tie_weights warns and does not tie); Mistral
    slides whenever sliding_window is set (use_sliding_window is Qwen's switch); the rope section's theta wins
    over a top-level one; a null pad_token_id is no padding row (it crashed the BERT loader)."""
    from safetensors.torch import load_file, save_file

    config = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    ours, _, folder = causal_lm_pair(config, tmp_path / "tied")
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not torch.equal(ref.lm_head.weight, ref.model.embed_tokens.weight)  # (transformers did not tie them)
    ours = from_pretrained(folder, task="causal-lm").eval()
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(input_ids=ids).logits, atol=ATOL, rtol=0)

    mistral = transformers.MistralConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    mistral.use_sliding_window = False  # (a Qwen field; transformers' Mistral reads sliding_window alone)
    ours, ref, _ = causal_lm_pair(mistral, tmp_path / "mistral")
    assert ours.config.sliding_window == 4
    with pytest.raises(ValueError, match=r"longer than the sliding window \(4\)"):
        ours(ids)

    causal_lm_pair(transformers.LlamaConfig(**{**config.to_diff_dict(), "tie_word_embeddings": False}),
                   tmp_path / "theta")
    cfg = json.loads((tmp_path / "theta" / "config.json").read_text())
    cfg.update(rope_theta=500.0, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    (tmp_path / "theta" / "config.json").write_text(json.dumps(cfg))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "theta").eval()
    ours = from_pretrained(tmp_path / "theta", task="causal-lm").eval()
    assert ours.config.rope_theta == ref.config.rope_parameters["rope_theta"] == 1e6
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(input_ids=ids).logits, atol=ATOL, rtol=0)

    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
        pad_token_id=None)).eval()
    bert.save_pretrained(tmp_path / "bert")
    assert json.loads((tmp_path / "bert" / "config.json").read_text())["pad_token_id"] is None
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(tmp_path / "bert").eval()(ids % 97).logits,
                                   bert(input_ids=ids % 97).logits, atol=ATOL, rtol=0)


def test_saved_config_names_the_saved_dtype(tmp_path):
    """A bf16 checkpoint loads as float32 parameters and saves float32 tensors, but its config kept "dtype":
    "bfloat16", so transformers reloaded the fine-tuned model in bf16 (logits 0.4 off; found by a probe)."""
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"]  # (and the older name of the key)
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(cfg))
    ours = from_pretrained(tmp_path / "bf16", task="causal-lm")
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    save_pretrained(ours, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["dtype"] == "float32" and "torch_dtype" not in saved
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert back.dtype == torch.float32


def test_damaged_index_and_config_fields_name_the_problem(tmp_path):
    """A damaged shard index or a config.json missing a field (or of a wrong type) raised bare JSONDecodeError /
    KeyError / TypeError / AttributeError (found by a probe)."""
    from safetensors.torch import load_file, save_file

    shutil.copy(os.path.join(minilm_dir(), "config.json"), tmp_path / "config.json")
    save_file(load_file(os.path.join(minilm_dir(), "model.safetensors")), str(tmp_path / "shard-1.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    for damage, message in (("{", "is unreadable"), ("[]", "holds a JSON list"), ("{}", "has no weight_map")):
        index.write_text(damage)
        with pytest.raises(CheckpointError, match=message):
            from_pretrained(tmp_path)
    index.write_text(json.dumps({"weight_map": {"embeddings.word_embeddings.weight": "shard-1.safetensors"}}))
    assert from_pretrained(tmp_path).newly_initialized == ["head.out.weight", "head.out.bias"]  # (a base model)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "vocab_size"}))
    with pytest.raises(CheckpointError, match="config.json lacks 'vocab_size', which a bert model needs"):
        from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="config.json has a field of the wrong type"):
        llmcore.models.loading.build_model({**DECODERS["llama"]().to_dict(), "rope_parameters": "x"}, "causal-lm")
    with pytest.raises(ValueError, match="pad_token_id null: RoBERTa counts positions"):
        llmcore.models.loading.build_model({"model_type": "roberta", "vocab_size": 9, "hidden_size": 8,
                                            "num_hidden_layers": 1, "num_attention_heads": 2,
                                            "intermediate_size": 8, "pad_token_id": None})
    with pytest.raises(ValueError, match="pad_token_id null: RoBERTa counts positions"):  # (a probe: forward failed)
        EncoderConfig(family="roberta", vocab_size=9, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8,
                      pad_token_id=None)
    # a pad_token_id past the vocabulary loaded with no padding row (transformers' embedding refuses it); a negative
    # one was no padding row either, where transformers' (torch's padding_idx) counts it from the vocabulary's end
    for pad in (9, -10, "0", True):
        with pytest.raises(ValueError, match=f"pad_token_id {pad!r} is not an id of the vocabulary \\(9 ids"):
            llmcore.models.loading.build_model({"model_type": "bert", "vocab_size": 9, "hidden_size": 8,
                                                "num_hidden_layers": 1, "num_attention_heads": 2,
                                                "intermediate_size": 8, "pad_token_id": pad})
    with pytest.raises(AssertionError, match="Padding_idx must be within num_embeddings"):  # (the reference refuses)
        transformers.BertModel(transformers.BertConfig(vocab_size=9, hidden_size=8, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=8, pad_token_id=9))
    ref = transformers.BertModel(transformers.BertConfig(vocab_size=9, hidden_size=8, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=8, pad_token_id=-1))
    ours = llmcore.models.loading.build_model({"model_type": "bert", "vocab_size": 9, "hidden_size": 8,
                                               "num_hidden_layers": 1, "num_attention_heads": 2,
                                               "intermediate_size": 8, "pad_token_id": -1})
    assert ours.embed.word.padding_idx == ref.embeddings.word_embeddings.padding_idx == 8
    # a null eps loaded and failed in the first forward naming no field; a string one ran (a probe)
    bert = {"model_type": "bert", "vocab_size": 9, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 8}
    for eps in (None, "1e-6", 0, float("inf"), True):
        with pytest.raises(ValueError, match=f"layer_norm_eps must be a positive number, got {eps!r}"):
            llmcore.models.loading.build_model({**bert, "layer_norm_eps": eps})
    with pytest.raises(ValueError, match="rms_norm_eps must be a positive number, got '1e-6'"):
        llmcore.models.loading.build_model({**DECODERS["llama"]().to_dict(), "rms_norm_eps": "1e-6"}, "causal-lm")
    with pytest.raises(ValueError, match="layer_norm_epsilon must be a positive number, got None"):
        llmcore.models.loading.build_model({**DECODERS["gpt2"]().to_dict(), "layer_norm_epsilon": None}, "causal-lm")


def test_checkpoint_errors(tmp_path):
    shutil.copy(os.path.join(minilm_dir(), "config.json"), tmp_path / "config.json")
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(minilm_dir(), "model.safetensors"))
    missing = {k: v for k, v in tensors.items() if "layer.2.intermediate" not in k}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing .*layers\.2\.mlp\.fc1"):
        from_pretrained(tmp_path)
    save_file({**tensors, "encoder.layer.9.output.dense.weight": torch.zeros(2, 2)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected .*encoder\.layer\.9"):
        from_pretrained(tmp_path)
    save_file({**tensors, "embeddings.word_embeddings.weight": torch.zeros(30522, 384, dtype=torch.int32)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="torch.int32, expected a floating-point dtype"):
        from_pretrained(tmp_path)
    save_file({**tensors, "pooler.dense.weight": torch.zeros(3, 3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape \(3, 3\), the model expects \(384, 384\)"):
        from_pretrained(tmp_path)
    # a fine-tuned 2-class head asked for 11 classes: said as such (it read "does config.json match the weights?")
    save_file({**tensors, "classifier.weight": torch.zeros(2, 384), "classifier.bias": torch.zeros(2)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="classification head has 2 classes, the model asked for 11"):
        from_pretrained(tmp_path, num_labels=11)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 't5'"):
        from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="floating-point dtype"):
        from_pretrained(minilm_dir(), dtype=torch.int64)


def test_input_errors():
    model = EncoderForSequenceClassification(EncoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                                                           intermediate_size=32, max_position_embeddings=16))
    with pytest.raises(TypeError, match="input_ids must be int64 or int32"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="cu_seqlens must run from 0 to 5"):
        model(torch.zeros(5, dtype=torch.long), cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="not both"):
        model(torch.zeros(4, dtype=torch.long), attention_mask=torch.ones(4),
              cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="packed input_ids must be 1-D"):
        model(torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    # an additive mask (0 attend, -inf masked) read as a bool attended to the padding only (a probe); 0/1 masks of
    # any dtype still work, and give the bool mask's logits
    ids = torch.tensor([[5, 6, 7, 0]])
    additive = torch.tensor([[0.0, 0.0, 0.0, float("-inf")]])
    with pytest.raises(ValueError, match="an additive 0 / -inf mask"):
        model(ids, attention_mask=additive)
    model.eval()
    with torch.no_grad():
        want = model(ids, attention_mask=torch.tensor([[True, True, True, False]])).logits
        for mask in (torch.tensor([[1, 1, 1, 0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])):
            torch.testing.assert_close(model(ids, attention_mask=mask).logits, want, rtol=0, atol=0)


def test_decoder_under_bf16_autocast(decoder):
    """bf16 autocast (as the loop's --bf16 runs a model): rotary decoders used to stop here, their float32 cos/sin
    promoting q and k but not v. Logits and the loss's gradients close to transformers' under the same autocast."""
    ours, ref, _ = decoder
    ours.eval(), ref.eval()  # no dropout (GPT-2's configs have some); the backward runs in eval mode too
    torch.manual_seed(2)
    ids = torch.randint(0, 101, (2, 13))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = ours(ids, labels=ids)
        b = ref(input_ids=ids, labels=ids)
        a.loss.backward(), b.loss.backward()
        assert (a.logits.float() - b.logits.float()).abs().max() < 0.1
    assert abs(a.loss.item() - b.loss.item()) < 0.02
    ours_grad = ours.embed.word.weight.grad
    ref_grad = ref.get_input_embeddings().weight.grad
    assert (ours_grad - ref_grad).norm() < 0.05 * ref_grad.norm()
    ours.zero_grad(), ref.zero_grad()


def test_bf16_weights(decoder):
    _, ref, path = decoder
    ours = from_pretrained(path, task="causal-lm", dtype=torch.bfloat16).eval()
    assert ours.embed.word.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        assert (ours(ids).logits.float() - ref.eval()(input_ids=ids).logits).abs().max() < 0.1
        # the loss comes back float32, as transformers' causal LM loss on bf16 weights (it was bf16: 4.59 for 4.58)
        loss, want = ours(ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss
        assert loss.dtype == torch.float32 and abs(loss.item() - want.item()) < 0.02


def test_rotary_frequencies_stay_float32_in_bf16_models(tmp_path):
    """from_pretrained(dtype=bf16) cast the RoPE frequencies with the weights (model.to), which transformers'
    from_pretrained keeps float32: cos was 0.5 off at positions past 1000 and position-sharp attention far from
    transformers' bf16 model (a probe). Now every cast and move keeps them float32 and equal to transformers'."""
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    _, _, path = causal_lm_pair(cfg, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).model.rotary_emb
    pos = torch.tensor([[0, 1, 1000, 2047, 4095]])
    want_cos, want_sin = theirs(torch.zeros(1, 5, 16), pos)
    ours = from_pretrained(path, task="causal-lm", dtype=torch.bfloat16)
    moved = from_pretrained(path, task="causal-lm").half().to(torch.bfloat16).to_empty(device="cpu")
    for model in (ours, moved):
        assert model.embed.word.weight.dtype == torch.bfloat16 and model.rotary.inv_freq.dtype == torch.float32
        assert torch.equal(model.rotary.inv_freq, theirs.inv_freq)
        cos, sin = model.rotary.cos_sin(pos, torch.float32)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama", "qwen2", "qwen3"])
def test_models_built_from_dataclasses_save_and_reload(family, tmp_path):
    from llmcore.models import DecoderConfig, DecoderForCausalLM

    torch.manual_seed(0)
    if family in ("bert", "distilbert"):
        cfg = EncoderConfig(family=family, vocab_size=60, hidden_size=32, num_layers=2, num_heads=4,
                            intermediate_size=48, max_position_embeddings=32,
                            type_vocab_size=2 if family == "bert" else 0, num_labels=3)
        model, task, auto = EncoderForSequenceClassification(cfg), "sequence-classification", \
            transformers.AutoModelForSequenceClassification
    else:
        cfg = DecoderConfig(family=family, vocab_size=60, hidden_size=32, num_layers=2, num_heads=4,
                            num_kv_heads=2 if family != "gpt2" else 4, head_dim=8, intermediate_size=48,
                            max_position_embeddings=32, attention_bias=family in ("gpt2", "qwen2"),
                            hidden_act="gelu_new" if family == "gpt2" else "silu",
                            tie_word_embeddings=family == "gpt2")
        model, task, auto = DecoderForCausalLM(cfg), "causal-lm", transformers.AutoModelForCausalLM
    model.eval().save_pretrained(tmp_path)
    again = from_pretrained(tmp_path, task=task).eval()
    if family in ("qwen2", "qwen3"):  # a window is written so that both read it (it was left out)
        cfg.sliding_window = 5
        DecoderForCausalLM(cfg).save_pretrained(tmp_path / "window")
        assert from_pretrained(tmp_path / "window", task=task).config.sliding_window == 5
        assert transformers.AutoConfig.from_pretrained(tmp_path / "window").layer_types == ["sliding_attention"] * 2
        cfg.sliding_window = None
    if family == "qwen2":
        with pytest.raises(ValueError, match="Qwen2's attention always has q/k/v biases"):
            DecoderConfig(family="qwen2", attention_bias=False)
        # a config.json's attention_bias false is ignored, as transformers' Qwen2 ignores it (a probe: the checkpoint
        # was refused); it loads and computes what transformers' model of that folder computes
        saved = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**saved, "attention_bias": False}))
        again = from_pretrained(tmp_path, task=task).eval()
        assert again.config.attention_bias
    theirs = auto.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 60, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(theirs(input_ids=ids).logits, model(ids).logits, atol=ATOL, rtol=0)


def test_configs_transformers_would_read_as_another_model_are_refused(tmp_path):
    """A probe: dataclass-built models saved fields they did not compute, and transformers reloaded another model
    (a Mistral with attention biases: 1.89 off; a Llama with hidden_act gelu on a SwiGLU MLP: 0.43 off; a GPT-2 with
    GQA: not loadable; a default distilbert config built a token-type table, added to every token, that
    save_pretrained then failed on). Read from a config.json as transformers reads it: a Mistral's attention_bias is
    ignored (its checkpoint was refused for missing biases), a Mistral without sliding_window slides at 4096; sizes
    of 0 (a ZeroDivisionError) and a rope_theta of 0 (taken as 10000) and num_labels 0 (the config's) are refused."""
    from llmcore.models import DecoderConfig

    for kwargs, message in [(dict(family="mistral", attention_bias=True), "Mistral has no attention biases"),
                            (dict(family="llama", hidden_act="gelu"), "MLP is SwiGLU"),
                            (dict(family="gpt2", num_kv_heads=16), "GPT-2 has num_kv_heads == num_heads"),
                            (dict(family="llama", num_heads=0), "num_heads must be a positive integer"),
                            (dict(family="llama", rope_theta=0.0), "rope_theta must be positive")]:
        with pytest.raises(ValueError, match=message):
            DecoderConfig(**kwargs)
    assert EncoderConfig(family="distilbert").type_vocab_size == 0 and EncoderConfig().type_vocab_size == 2
    with pytest.raises(ValueError, match="distilbert has no token types and layer_norm_eps 1e-12"):
        EncoderConfig(family="distilbert", layer_norm_eps=1e-5)
    torch.manual_seed(0)
    model = EncoderForSequenceClassification(EncoderConfig(family="distilbert", vocab_size=60, hidden_size=32,
                                                           num_layers=1, num_heads=4, intermediate_size=48)).eval()
    model.save_pretrained(tmp_path / "distilbert")
    ids = torch.randint(1, 60, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(transformers.AutoModelForSequenceClassification.from_pretrained(
            tmp_path / "distilbert").eval()(input_ids=ids).logits, model(ids).logits, atol=ATOL, rtol=0)

    mistral = transformers.MistralConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    ours, ref, folder = causal_lm_pair(mistral, tmp_path / "mistral")
    assert json.loads((folder / "config.json").read_text())["attention_bias"] is True
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, ref.eval()(input_ids=ids).logits, atol=ATOL, rtol=0)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["sliding_window"]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert from_pretrained(folder, task="causal-lm").config.sliding_window == \
        transformers.AutoConfig.from_pretrained(folder).sliding_window == 4096
    for key, value, message in [("num_attention_heads", 0, "num_attention_heads must be a positive integer"),
                                ("rope_parameters", {**cfg["rope_parameters"], "rope_theta": 0},
                                 "rope_theta must be positive")]:
        (folder / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=message):
            from_pretrained(folder, task="causal-lm")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_labels must be a positive integer"):
            from_pretrained(minilm_dir(), num_labels=bad)


@pytest.mark.parametrize("bias", [(True, True, True), (True, False, True), (False, False, False)])
def test_fused_projection_under_autocast_is_exact(bias):
    """The q/k/v projections run as one GEMM on the concatenated weights; under bf16 autocast the
    weights are cast before the concatenation: outputs and float32 gradients equal those of
    casting the concatenated fp32 weights (what autocast itself would do) bit for bit."""
    from torch import nn

    from llmcore.nn.layers import _fused_linear

    torch.manual_seed(0)
    linears = [nn.Linear(48, w, bias=b) for w, b in zip((48, 16, 16), bias)]
    x = torch.randn(2, 7, 48)
    grads = [torch.randn(2, 7, w) for w in (48, 16, 16)]

    def reference(x):
        weight = torch.cat([lin.weight for lin in linears])
        b = None if not any(bias) else torch.cat([lin.bias if lin.bias is not None else
                                                   torch.zeros(lin.out_features) for lin in linears])
        return nn.functional.linear(x, weight, b).split([48, 16, 16], dim=-1)

    results = []
    for fn in (reference, lambda x: _fused_linear(x, tuple(linears))):
        for lin in linears:
            lin.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = fn(x)
        torch.autograd.backward(outs, grads)
        results.append(([o.detach() for o in outs], [p.grad.clone() for lin in linears for p in lin.parameters()]))
    (outs_a, grads_a), (outs_b, grads_b) = results
    assert all(o.dtype == torch.bfloat16 for o in outs_b)
    assert all(g.dtype == torch.float32 for g in grads_b)
    for a, b in zip(outs_a + grads_a, outs_b + grads_b):
        assert torch.equal(a, b)


def test_classifier_refuses_sequences_of_no_tokens(minilm):
    """A packed batch with an empty sequence (cu_seqlens repeating a value: a text encoded without special tokens)
    gave that sequence a row of logits read from no token of its own; a padded batch of length 0 failed with an
    IndexError. Both are refused, naming the problem."""
    model = minilm[0]
    ids = torch.randint(1000, 2000, (7,))
    with pytest.raises(ValueError, match="a sequence of no tokens"):
        model(input_ids=ids, cu_seqlens=torch.tensor([0, 3, 3, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="a sequence of no tokens"):
        model(input_ids=torch.zeros(2, 0, dtype=torch.long))
    assert model(input_ids=ids, cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)).logits.shape[0] == 2
    assert model(input_ids=torch.zeros(0, 4, dtype=torch.long)).logits.shape[0] == 0  # (no rows: nothing to read)


def test_compiled_fullgraph_with_an_attention_mask():
    """torch.compile(fullgraph=True) of a model called with an attention_mask: the padding check (is anything
    masked?) read the mask's values, data-dependent control flow that fullgraph refused; compiled, the mask goes to
    attention as it is, and the logits are the eager ones."""
    from llmcore.models import DecoderForCausalLM
    from llmcore.models.config import DecoderConfig

    torch.manual_seed(0)
    model = DecoderForCausalLM(DecoderConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4,
                                             num_kv_heads=2, head_dim=8, intermediate_size=48)).eval()
    ids = torch.randint(0, 50, (2, 7))
    for mask in (torch.ones(2, 7, dtype=torch.long), torch.tensor([[1] * 7, [1] * 5 + [0] * 2])):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        with torch.no_grad():
            got, want = compiled(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        keep = mask.bool()
        torch.testing.assert_close(got[keep], want[keep])


class _LoRALinear(torch.nn.Linear):
    """A LoRA-style adapter: the base linear plus B(A(x)), as peft's and loralib's add theirs."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        self.lora_a = torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.3)
        self.lora_b = torch.nn.Parameter(torch.randn(base.out_features, rank) * 0.3)

    def forward(self, x):
        return super().forward(x) + x @ self.lora_a.t() @ self.lora_b.t()

    def merged(self) -> torch.nn.Linear:
        plain = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        plain.load_state_dict({"weight": self.weight + self.lora_b @ self.lora_a,
                               **({"bias": self.bias} if self.bias is not None else {})})
        return plain


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_adapters_hooks_and_parametrizations_on_the_linear_layers_count(family):
    """The attention and MLP layers (and the LM head) computed from their nn.Linear's weight without calling it:
    forward hooks never fired, a LoRA adapter changed nothing (its A got no gradient), weight_norm's pre-hook
    never ran (found by a probe). A linear that is not a plain, unhooked nn.Linear runs its own forward: an
    adapted model equals the one with the adapter merged into its weights, and the adapter gets gradients."""
    from llmcore.models import DecoderConfig, DecoderForCausalLM

    torch.manual_seed(0)
    if family == "bert":
        model = EncoderForSequenceClassification(EncoderConfig(vocab_size=60, hidden_size=32, num_layers=2,
                                                               num_heads=4, intermediate_size=48,
                                                               max_position_embeddings=32, hidden_dropout=0.0,
                                                               attention_dropout=0.0))
        adapted = [("layers.0.attn.q", None), ("layers.1.attn.v", None), ("layers.0.mlp.fc1", None)]
    else:
        model = DecoderForCausalLM(DecoderConfig(family="llama", vocab_size=60, hidden_size=32, num_layers=2,
                                                 num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
                                                 max_position_embeddings=32))
        adapted = [("layers.0.attn.k", None), ("layers.1.mlp.up", None), ("lm_head", None)]
    model.eval()
    merged = copy.deepcopy(model)
    for name, _ in adapted:
        parent, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        lora = _LoRALinear(model.get_submodule(name))
        setattr(model.get_submodule(parent) if parent else model, leaf, lora)
        setattr(merged.get_submodule(parent) if parent else merged, leaf, lora.merged())
    ids = torch.randint(1, 60, (2, 9))
    kwargs = {"labels": ids} if family == "llama" else {"labels": torch.tensor([0, 1])}
    out, ref = model(ids, **kwargs), merged(ids, **kwargs)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert all(model.get_submodule(name).lora_a.grad is not None for name, _ in adapted)

    seen = []
    for name in ("layers.0.attn.o", "layers.1.attn.q"):
        merged.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.append(name))
    merged(ids)
    assert sorted(seen) == ["layers.0.attn.o", "layers.1.attn.q"]
    fc = "layers.0.mlp.fc2" if family == "bert" else "layers.0.mlp.down"
    scaled = copy.deepcopy(merged)
    scaled.get_submodule(fc).weight.data *= 3
    torch.nn.utils.parametrizations.weight_norm(merged.get_submodule(fc))
    with torch.no_grad():
        merged.get_submodule(fc).parametrizations.weight.original0.mul_(3)  # (the norm g: the weight times 3)
    torch.testing.assert_close(merged(ids).logits, scaled(ids).logits, atol=1e-5, rtol=1e-5)


def test_attention_layer_refuses_inputs_it_would_misread():
    """llmcore.nn.Attention took a 4-D input and attended across the wrong axis, and a float 1/0 Batch.key_mask
    was added to the scores, masking nothing (found by a probe): both refused by name."""
    from llmcore.nn.layers import Attention, Batch

    attn = Attention(32, 4)
    with pytest.raises(ValueError, match=r"padded \(B, L, D\) hidden states, got 4-D"):
        attn(torch.randn(2, 3, 5, 32), Batch())
    with pytest.raises(TypeError, match="key_mask must be bool"):
        attn(torch.randn(2, 5, 32), Batch(key_mask=torch.ones(2, 5)))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(attn(x, Batch(key_mask=mask))[1, :3], attn(x[1:, :3], Batch())[0])


def test_sequences_past_the_learned_positions_are_refused_by_name():
    """A sequence past max_position_embeddings (BERT, RoBERTa from padding_idx + 1, GPT-2's n_positions) was a bare
    'IndexError: index out of range in self' (a probe)."""
    from llmcore.models import DecoderConfig, DecoderForCausalLM

    bert = EncoderForSequenceClassification(EncoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                                                          intermediate_size=32, max_position_embeddings=16))
    roberta = EncoderForSequenceClassification(EncoderConfig(family="roberta", vocab_size=50, hidden_size=16,
                                                             num_layers=1, num_heads=2, intermediate_size=32,
                                                             max_position_embeddings=16, pad_token_id=1))
    gpt2 = DecoderForCausalLM(DecoderConfig(family="gpt2", vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                                            num_kv_heads=2, head_dim=8, intermediate_size=32,
                                            max_position_embeddings=16))
    for model, fits in ((bert, 16), (roberta, 14), (gpt2, 16)):
        model(torch.randint(2, 50, (1, fits)))
        with pytest.raises(ValueError, match=f"sequences of {fits + 1} tokens are longer than the model's {fits} "):
            model(torch.randint(2, 50, (1, fits + 1)))
        with pytest.raises(ValueError, match="longer than the model's"):  # (packed: the longest sequence)
            model(torch.randint(2, 50, (fits + 3,)), cu_seqlens=torch.tensor([0, 2, fits + 3], dtype=torch.int32))
    # RoBERTa's pads take its padding position: a padded row of 14 real tokens fits, whatever the padding (a probe)
    ids = torch.randint(2, 50, (2, 16))
    ids[0, 14:] = 1
    mask = (ids != 1).long()
    roberta(ids[:1], attention_mask=mask[:1])
    with pytest.raises(ValueError, match="sequences of 16 tokens"):
        roberta(ids, attention_mask=mask)


def test_a_hook_on_the_last_encoder_layer_sees_every_row(minilm, sst2_batch):
    """The classifier's last layer computed the first token's rows only, so a forward hook there (a sentence
    embedder mean-pooling the last layer, as all-MiniLM is used) got (B, 1, H) rows (a probe); with a hook of the
    user's watching it runs whole, as transformers' model does, and the logits stay the same."""
    ours, ref = minilm
    padded, _ = sst2_batch
    ours.eval()
    with torch.no_grad():
        before = ours(**padded).logits
    seen = {}
    handles = [ours.layers[-1].register_forward_hook(lambda m, i, o: seen.setdefault("ours", o)),
               ref.bert.encoder.layer[-1].register_forward_hook(
                   lambda m, i, o: seen.setdefault("ref", o[0] if isinstance(o, tuple) else o))]
    try:
        with torch.no_grad():
            after = ours(**padded).logits
            ref.eval()(**padded)
    finally:
        for handle in handles:
            handle.remove()
    assert seen["ours"].shape == seen["ref"].shape == (*padded["input_ids"].shape, 384)
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(seen["ours"][real], seen["ref"][real], atol=1e-4, rtol=0)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
