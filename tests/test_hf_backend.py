"""llmcore.hf: llmcore attention and fused ops inside unmodified transformers models.

Every check compares against the same model on transformers' own "sdpa" path: the real
MiniLM checkpoint (BERT) and small randomly initialised GPT-2, Llama (GQA), Mistral, Qwen2 and
Qwen3 causal LMs and BERT, RoBERTa, ELECTRA and DistilBERT sequence classifiers.
"""
import copy
import functools
import inspect
import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

import llmcore.ops
from llmcore import hf
from tokenizer_refs import minilm_dir

FUSED_OPS = ("layer_norm", "rms_norm", "bias_gelu", "swiglu", "rotary_embedding", "dropout")
FP32 = {"atol": 1e-5, "rtol": 1e-5}
SENTENCES = [
    "a gripping , beautifully acted film that stays with you long after the credits roll .",
    "dull .",
    "the plot is thin and the jokes fall flat , but the lead performance is oddly charming .",
    "an utterly forgettable sequel .",
]


@pytest.fixture(autouse=True)
def llmcore_at_every_size(monkeypatch):
    """These tests check llmcore's ops inside the models on small inputs: small inference calls, which patch()
    otherwise hands to transformers' own computation (hf.TORCH_BELOW; tested on its own below), run llmcore's."""
    monkeypatch.setattr(hf, "TORCH_BELOW", dict.fromkeys(hf.TORCH_BELOW, 0))


# ---------------------------------------------------------------------------------------
# models


def _load_minilm(attn):
    torch.manual_seed(0)  # the classification head is freshly initialised
    return transformers.BertForSequenceClassification.from_pretrained(
        minilm_dir(), num_labels=2, attn_implementation=attn, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0).eval()


@pytest.fixture(scope="module")
def minilm():
    """(sdpa model, model loaded with attn_implementation="llmcore", padded batch)."""
    from tokenizers import Tokenizer

    hf.register()
    tok = Tokenizer.from_file(os.path.join(minilm_dir(), "tokenizer.json"))
    tok.no_padding()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(SENTENCES)
    batch = {"input_ids": torch.tensor([e.ids for e in enc]),
             "token_type_ids": torch.tensor([e.type_ids for e in enc]),
             "attention_mask": torch.tensor([e.attention_mask for e in enc])}
    assert (batch["attention_mask"] == 0).any(), "the batch should contain padding"
    return _load_minilm("sdpa"), _load_minilm("llmcore"), batch


def _config(kind, **over):
    common = {"vocab_size": 96, "attn_implementation": "sdpa"}
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, **common)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       **common)
    elif kind in ("qwen2", "mistral", "qwen3"):
        cls = {"qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig,
               "qwen3": transformers.Qwen3Config}[kind]
        cfg = cls(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, **common)
    else:
        raise ValueError(kind)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def _pair(kind, **over):
    """The same random model twice: on transformers' sdpa, and switched to llmcore."""
    hf.register()
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(_config(kind, **over)).eval()
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("llmcore")
    assert ours.config._attn_implementation == "llmcore" and ref.config._attn_implementation == "sdpa"
    return ref, ours


def _lm_batch(mask, batch=3, length=13, vocab=96):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    if mask == "none":
        return {"input_ids": ids}
    am = torch.ones(batch, length, dtype=torch.long)
    if mask == "right":
        am[1, 9:] = 0
        am[2, 5:] = 0
    else:  # left padding, as for generation
        am[1, :4] = 0
        am[2, :7] = 0
    return {"input_ids": ids, "attention_mask": am}


def _assert_hidden_close(out, out_ref, attention_mask):
    """Hidden states agree at fp32 rounding on real tokens. Padded rows only attend real keys
    but start from [PAD] embeddings that the layers amplify; eager and sdpa already differ
    there by 7e-5, so they get a looser bound."""
    real = attention_mask.bool()
    for h, h_ref in zip(out.hidden_states, out_ref.hidden_states):
        torch.testing.assert_close(h[real], h_ref[real], **FP32)
        torch.testing.assert_close(h[~real], h_ref[~real], atol=5e-4, rtol=1e-4)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(ref, ours, atol=1e-5, rtol=1e-4):
    g_ref, g_ours = _grads(ref), _grads(ours)
    assert g_ref.keys() == g_ours.keys() and g_ref
    for n in g_ref:
        torch.testing.assert_close(g_ours[n], g_ref[n], atol=atol, rtol=rtol, msg=lambda m, n=n: f"grad of {n}: {m}")


# ---------------------------------------------------------------------------------------
# spies


@pytest.fixture
def spy(monkeypatch):
    """Records the calls llmcore.hf makes into llmcore's attention ops."""
    calls = {"sdpa": [], "varlen": []}
    sdpa, varlen = hf.scaled_dot_product_attention, hf.varlen_attention

    def sdpa_spy(q, k, v, attn_mask=None, **kw):
        calls["sdpa"].append(dict(q=tuple(q.shape), k=tuple(k.shape), dtype=q.dtype,
                                  mask=None if attn_mask is None else attn_mask.dtype, **kw))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    def varlen_spy(q, k, v, *args, **kw):
        calls["varlen"].append(dict(q=tuple(q.shape), k=tuple(k.shape), args=args, **kw))
        return varlen(q, k, v, *args, **kw)

    monkeypatch.setattr(hf, "scaled_dot_product_attention", sdpa_spy)
    monkeypatch.setattr(hf, "varlen_attention", varlen_spy)
    return calls


# ---------------------------------------------------------------------------------------
# register()


def test_register_is_idempotent_and_wires_both_registries():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert hf.register() == "llmcore"
    assert hf.register() == "llmcore"
    assert ALL_ATTENTION_FUNCTIONS["llmcore"] is hf.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["llmcore"] is sdpa_mask


def test_minilm_from_pretrained_matches_sdpa(minilm, spy):
    ref, ours, batch = minilm
    assert ours.config._attn_implementation == "llmcore"
    with torch.no_grad():
        out_ref = ref(**batch, output_hidden_states=True)
        out = ours(**batch, output_hidden_states=True)
    torch.testing.assert_close(out.logits, out_ref.logits, **FP32)
    _assert_hidden_close(out, out_ref, batch["attention_mask"])
    assert len(spy["sdpa"]) == 6
    assert all(c["mask"] == torch.bool and not c["is_causal"] and c["dropout_p"] == 0.0 for c in spy["sdpa"])


def test_minilm_training_gradients_match_sdpa(minilm):
    ref, ours = (copy.deepcopy(m) for m in minilm[:2])
    batch = minilm[2]
    labels = torch.tensor([1, 0, 0, 0])
    for m in (ref, ours):
        m.train()
        m(**batch, labels=labels).loss.backward()
    _assert_grads_close(ref, ours)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("mask", ["none", "right", "left"])
def test_causal_lm_logits_match_sdpa(kind, mask, spy):
    ref, ours = _pair(kind)
    batch = _lm_batch(mask)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, ref(**batch).logits, **FP32)
    calls = spy["sdpa"]
    assert len(calls) == 2
    for c in calls:
        gqa = kind != "gpt2"
        assert c["enable_gqa"] is gqa and c["k"][1] == (2 if gqa else 4)  # K/V heads are not repeated
        # transformers builds no mask for an unpadded causal batch: the kernel masks causally itself
        assert (c["mask"], c["is_causal"]) == ((None, True) if mask == "none" else (torch.bool, False))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_causal_lm_training_gradients_match_sdpa(kind):
    ref, ours = _pair(kind)
    batch = _lm_batch("right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    losses = []
    for m in (ref, ours):
        m.train()
        loss = m(**batch, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], **FP32)
    _assert_grads_close(ref, ours)


def _bf16_errors(ref, ours, batch, logits=lambda o: o.logits):
    """Max abs error of the bf16-autocast logits of each model against the fp32 sdpa logits."""
    with torch.no_grad():
        exact = logits(ref(**batch))
        errs = []
        for m in (ref, ours):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                errs.append((logits(m(**batch)).float() - exact).abs().max().item())
    return errs


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_causal_lm_bf16_autocast_parity(kind, spy):
    err_sdpa, err_ours = _bf16_errors(*_pair(kind), _lm_batch("right"))
    assert all(c["dtype"] == torch.bfloat16 for c in spy["sdpa"])
    assert err_ours <= 2 * err_sdpa + 1e-2, (err_ours, err_sdpa)


def test_minilm_bf16_autocast_parity(minilm):
    err_sdpa, err_ours = _bf16_errors(*minilm)
    assert err_ours <= 2 * err_sdpa + 1e-2, (err_ours, err_sdpa)


def test_attention_dropout_in_training_mode(spy):
    _ref, ours = _pair("llama", attention_dropout=0.5)
    batch = _lm_batch("right")
    with torch.no_grad():
        ours.eval()
        plain = ours(**batch).logits
        assert all(c["dropout_p"] == 0.0 for c in spy["sdpa"])
        ours.train()
        torch.manual_seed(3)
        a = ours(**batch).logits
        torch.manual_seed(3)
        b = ours(**batch).logits
    assert spy["sdpa"][-1]["dropout_p"] == 0.5
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # reproducible from torch's seed
    assert not torch.allclose(a, plain, atol=1e-3)


def _packed(vocab=96, lengths=(5, 7, 4)):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    fa = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths)}
    return ids, pos, fa, lengths


def _each_alone(model, ids, lengths):
    """The logits of each sequence packed in row ``ids`` run alone, concatenated as packed."""
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    return torch.cat([model(ids[:, s:e]).logits for s, e in zip(starts, starts[1:])], dim=1)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "mistral"])
def test_packed_batch_runs_varlen(kind, spy):
    ref, ours = _pair(kind)
    ids, pos, fa, lengths = _packed()
    with torch.no_grad():
        out = ours(ids, position_ids=pos, use_cache=False, **fa).logits
        each = _each_alone(ref, ids, lengths)
    torch.testing.assert_close(out, each, **FP32)
    assert len(spy["varlen"]) == 2 and not spy["sdpa"]
    assert spy["varlen"][0]["q"] == (ids.shape[1], 4, 16) and spy["varlen"][0]["is_causal"]

    # gradients against sdpa on the same packed row, which masks by position_ids
    labels = ids.clone()
    for m, kw in ((ref, {}), (ours, fa)):
        m.train()
        m(ids, position_ids=pos, labels=labels, use_cache=False, **kw).loss.backward()
    _assert_grads_close(ref, ours)


def test_packed_batch_with_a_sliding_window():
    """Mistral's sliding window (4096 by default: the test above) reaches every key of sequences no longer than it:
    packed, they run; a longer one is refused, naming both (varlen attention takes no window)."""
    ids, pos, fa, lengths = _packed()
    ref, ours = _pair("mistral", sliding_window=max(lengths))
    with torch.no_grad():
        each = _each_alone(ref, ids, lengths)
        torch.testing.assert_close(ours(ids, position_ids=pos, use_cache=False, **fa).logits, each, **FP32)
    ours.config.sliding_window = max(lengths) - 1
    with pytest.raises(ValueError, match=r"`sliding_window` \(6\) with packed \(cu_seq_lens\) sequences longer than "
                                         r"it \(max_length_k 7\)"):
        ours(ids, position_ids=pos, use_cache=False, **fa)


def _window_only_in_the_mask(kind, window):
    """A tiny model that applies its sliding window (or Llama 4's chunks) only through the mask it builds: the
    attention function gets no ``sliding_window`` argument."""
    hf.register()
    torch.manual_seed(0)
    small = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64)
    if kind == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                          shared_expert_intermediate_size=32, num_experts_per_tok=2,
                                          use_sliding_window=True, sliding_window=window, max_window_layers=0,
                                          layer_types=["sliding_attention"] * 2, **small)
    elif kind == "phimoe":
        cfg = transformers.PhimoeConfig(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                                        sliding_window=window, **small)
    else:
        cfg = transformers.Llama4TextConfig(intermediate_size=96, intermediate_size_mlp=96, num_local_experts=2,
                                            num_experts_per_tok=1, head_dim=16, attention_chunk_size=window,
                                            no_rope_layers=[1, 0], **small)
    cfg._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind, name", [("qwen2_moe", "sliding_window"), ("phimoe", "config.sliding_window"),
                                        ("llama4", "attention_chunk_size")])
def test_packed_batch_where_the_window_is_only_in_the_mask(kind, name):
    """Qwen2-MoE, PhiMoE and Llama 4 (chunks) apply their window only through the mask, which packed inputs drop,
    and pass the attention function no sliding_window: packed, the window was silently lost (a probe: logits off by
    0.4 from each sequence run alone). Longer sequences are refused now; shorter ones, which no window cuts, run."""
    ids, pos, fa, lengths = _packed()
    for window in (max(lengths) - 1, max(lengths)):
        ref = _window_only_in_the_mask(kind, window)
        ours = copy.deepcopy(ref)
        ours.set_attn_implementation("llmcore")
        with torch.no_grad():
            each = _each_alone(ref, ids, lengths)
            if window < max(lengths):
                with pytest.raises(ValueError, match=rf"`{name}` \({window}\) with packed .* \(max_length_k 7\)"):
                    ours(ids, position_ids=pos, use_cache=False, **fa)
                # (without the cu_seq_lens arguments the mask carries the window, and llmcore follows it)
                torch.testing.assert_close(ours(ids, position_ids=pos, use_cache=False).logits, each, **FP32)
            else:
                torch.testing.assert_close(ours(ids, position_ids=pos, use_cache=False, **fa).logits, each, **FP32)


def test_gemma4_kv_shared_layers_under_logits_to_keep():
    """Gemma 4 slices the queries of its KV-shared layers to the last logits_to_keep tokens for every attention but
    sdpa when no mask is built; llmcore's is_causal then took them for a StaticCache prefill's first queries and
    cut the keys (a probe: logits_to_keep=3 off by 0.22 from eager). Each query sees the keys up to its position."""
    if not hasattr(transformers, "Gemma4TextConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma 4")
    hf.register()
    torch.manual_seed(0)
    cfg = transformers.Gemma4TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=16, sliding_window=4, vocab_size_per_layer_input=96,
        layer_types=["sliding_attention", "full_attention"] * 2, hidden_size_per_layer_input=8,
        num_kv_shared_layers=2, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    ref = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("llmcore")
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = ref(ids).logits
        for keep in (1, 3, 12):
            torch.testing.assert_close(ours(ids, logits_to_keep=keep).logits, full[:, -keep:], **FP32)
    for cache in (None, "static"):  # (a StaticCache prefill's keys past the prompt stay out of reach)
        kw = dict(max_new_tokens=4, do_sample=False, cache_implementation=cache)
        assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw)), cache


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_small_inference_calls_run_torch_and_the_rest_llmcore(kind, monkeypatch, spy):
    """patch()'s rows thresholds (hf.TORCH_BELOW): a decode step under no_grad (one query row) runs torch's SDPA and
    transformers' norm / MLP / RoPE code, with the unpatched model's logits and greedy tokens; the same step with a
    gradient to compute, and a prompt at or above the thresholds, run llmcore's ops."""
    monkeypatch.setattr(hf, "TORCH_BELOW", {"attention": 16, "layer_norm": 16, "rms_norm": 16, "bias_gelu": 16,
                                            "swiglu": 16, "rotary_embedding": 16})
    ref, ours = _pair(kind)
    hf.patch(ours)
    used = []
    for name in FUSED_OPS[:-1]:  # (dropout: p = 0 in these configs, not part of the thresholds)
        real = getattr(llmcore.ops, name)
        monkeypatch.setattr(llmcore.ops, name, functools.partial(lambda real, name, *a, **k: used.append(name) or
                                                                 real(*a, **k), real, name))
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = ours(ids[:, :16], use_cache=True)
        assert len(spy["sdpa"]) == 2 and used, "a 16-token prompt runs llmcore's ops"
        spy["sdpa"].clear(), used.clear()
        step = ours(ids[:, 16:17], cache=out.past_key_values, use_cache=True).logits
        assert spy["sdpa"] == [] and used == [], (spy["sdpa"], used)
        want = ref(ids[:, :17]).logits[:, -1:]
    torch.testing.assert_close(step, want, **FP32)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids[:, :5], **kw), ref.generate(ids[:, :5], **kw))
    spy["sdpa"].clear(), used.clear()
    ours(ids[:, :1]).logits.sum().backward()  # grad enabled, parameters need it: llmcore's ops at one row
    assert len(spy["sdpa"]) == 2 and used


def test_unknown_tensor_arguments_are_refused():
    """An attention function gets the attention module's keyword arguments; llmcore dropped those it did not know,
    so Inkling2's sinks and DeepSeek-V3.2's sparse ``indices`` ran as dense attention (a probe: logits off by
    0.05-0.5). A tensor argument llmcore does not know is refused, naming it; the inert ones transformers passes
    (position_ids, num_items_in_batch, ...) are not."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 6, 16, generator=g) for _ in range(3))
    module = nn.Module()
    for name in ("sinks", "indices"):
        with pytest.raises(ValueError, match=rf"tensor argument\(s\) \['{name}'\] that Module passes"):
            hf.attention_forward(module, q, k, v, None, **{name: torch.zeros(4)})
    out, _ = hf.attention_forward(module, q, k, v, None, scaling=0.25, position_ids=torch.arange(6)[None],
                                  num_items_in_batch=torch.tensor(6), cache_position=torch.arange(6))
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, scale=0.25)
    torch.testing.assert_close(out, want.transpose(1, 2).float(), **FP32)


def test_packed_batch_rejects_batch_above_one():
    _, ours = _pair("llama")
    ids, pos, fa, _ = _packed()
    with pytest.raises(ValueError, match="batch size 1"):
        ours(ids.expand(2, -1), position_ids=pos.expand(2, -1), use_cache=False, **fa)


def test_from_config_with_llmcore_attn_implementation(spy):
    hf.register()
    cfg = _config("qwen2")
    cfg._attn_implementation = "llmcore"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    assert model.config._attn_implementation == "llmcore"
    with torch.no_grad():
        model(**_lm_batch("right"))
    assert len(spy["sdpa"]) == 2


def test_custom_4d_additive_float_mask(spy):
    """A caller's own 4D float mask reaches the kernel unchanged (transformers passes it through)."""
    ref, ours = _pair("llama")
    ids = _lm_batch("none")["input_ids"]
    n = ids.shape[1]
    allowed = torch.ones(n, n).tril().bool() & (torch.arange(n)[None, :] % 3 != 1)  # causal, some keys hidden
    allowed |= torch.eye(n, dtype=torch.bool)
    mask = torch.zeros(ids.shape[0], 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits, **FP32)
    assert all(c["mask"] == torch.float32 and not c["is_causal"] for c in spy["sdpa"])


def test_t5_position_bias_and_cross_attention_match_sdpa(spy):
    """T5 adds a learned relative-position bias through the mask: forward and gradients."""
    hf.register()
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                                attn_implementation="sdpa")
    ref = transformers.T5ForConditionalGeneration(cfg)
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("llmcore")
    g = torch.Generator().manual_seed(4)
    ids, labels = torch.randint(1, 64, (2, 9), generator=g), torch.randint(1, 64, (2, 5), generator=g)
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, 6:] = 0
    out_ref, out = (m(input_ids=ids, attention_mask=am, labels=labels) for m in (ref, ours))
    torch.testing.assert_close(out.logits, out_ref.logits, **FP32)
    out_ref.loss.backward()
    out.loss.backward()
    _assert_grads_close(ref, ours)
    assert len(spy["sdpa"]) == 6  # encoder self, decoder self and cross attention, 2 layers each
    assert all(c["mask"] == torch.float32 for c in spy["sdpa"])  # bias folded into an additive mask


def test_generation_with_cache_matches_sdpa():
    ref, ours = _pair("llama")
    batch = _lm_batch("left", length=6)
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    torch.testing.assert_close(ours.generate(**batch, **kw), ref.generate(**batch, **kw), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------
# errors


def test_register_without_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise
    with pytest.raises(ImportError, match=r"needs Hugging Face transformers>=4\.53"):
        hf.register()
    with pytest.raises(ImportError, match="transformers"):
        hf.patch(nn.Linear(2, 2))


def test_register_with_old_transformers(monkeypatch):
    # sys.modules, not the module imported above: transformers' direct_transformers_import
    # (processing_utils) puts a fresh lazy module there on first use.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.40.0")
    with pytest.raises(ImportError, match="found 4.40.0"):
        hf.register()


def test_softcap_is_rejected():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="softcap"):
        hf.attention_forward(nn.Module(), q, q, q, None, softcap=30.0)


# ---------------------------------------------------------------------------------------
# patch(): plumbing, with plain-PyTorch ops under the fused ops' contract


def _ref_layer_norm(x, weight, bias, eps=1e-5, residual=None):
    h = x if residual is None else x + residual
    out = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return out if residual is None else (out, h)


def _ref_rms_norm(x, weight, eps=1e-6, residual=None):
    h = x if residual is None else x + residual
    hf32 = h.float()
    out = (hf32 * torch.rsqrt(hf32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype) * weight
    return out if residual is None else (out, h)


def _ref_bias_gelu(x, bias, approximate="none"):
    return F.gelu(x + bias, approximate=approximate)


def _ref_swiglu(gate, up):
    return F.silu(gate) * up


def _ref_rotary_embedding(x, cos, sin):
    """x (..., H, D) rotated as transformers' rotate-half RoPE, cos / sin (..., D) over the heads, in x's dtype."""
    half = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return (x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin).to(x.dtype)


def _ref_dropout(x, p=0.5, training=True):
    return F.dropout(x, p, training)


@pytest.fixture
def ref_ops(monkeypatch):
    """Stands the plain-PyTorch versions in for the fused ops, counting calls."""
    calls = dict.fromkeys(FUSED_OPS, 0)
    for name, fn in zip(FUSED_OPS, (_ref_layer_norm, _ref_rms_norm, _ref_bias_gelu, _ref_swiglu,
                                    _ref_rotary_embedding, _ref_dropout)):
        def counted(*a, _fn=fn, _name=name, **kw):
            calls[_name] += 1
            return _fn(*a, **kw)
        monkeypatch.setattr(llmcore.ops, name, counted, raising=False)
    return calls


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


EXPECTED = {
    "minilm": {"attention": 6, "layer_norm": 13, "rms_norm": 0, "bias_gelu": 6, "swiglu": 0, "rotary_embedding": 0,
               "dropout": 20, "embedding": 3, "linear_cross_entropy": 0,  # dropout: embeddings, 3 a layer, classifier
               "first_token_layer": 1},
    "gpt2": {"attention": 2, "layer_norm": 5, "rms_norm": 0, "bias_gelu": 2, "swiglu": 0, "rotary_embedding": 0,
             "dropout": 7, "embedding": 2, "linear_cross_entropy": 1, "first_token_layer": 0},
    "llama": {"attention": 2, "layer_norm": 0, "rms_norm": 5, "bias_gelu": 0, "swiglu": 2, "rotary_embedding": 2,
              "dropout": 0, "embedding": 1, "linear_cross_entropy": 1, "first_token_layer": 0},
    "qwen2": {"attention": 2, "layer_norm": 0, "rms_norm": 5, "bias_gelu": 0, "swiglu": 2, "rotary_embedding": 2,
              "dropout": 0, "embedding": 1, "linear_cross_entropy": 1, "first_token_layer": 0},
    # dropout: embeddings, 2 a layer (attention's, FFN's), the classifier's
    "distilbert": {"attention": 2, "layer_norm": 5, "rms_norm": 0, "bias_gelu": 2, "swiglu": 0, "rotary_embedding": 0,
                   "dropout": 6, "embedding": 2, "linear_cross_entropy": 0, "first_token_layer": 1},
}


def _encoder_classifier(kind, **over):
    """A random sequence classifier of the BERT family (``kind``: bert, roberta, electra, distilbert: the guide's
    model family) on transformers' sdpa, and a right-padded batch. ``over``: config fields."""
    hf.register()
    torch.manual_seed(0)
    # initializer_range 0.2, not 0.02: GELU's inputs then reach where its forms differ (the tanh form differs from
    # erf's by < 1e-6 below 0.1, by 1e-3 near 2)
    common = {"vocab_size": 96, "initializer_range": 0.2, "attn_implementation": "sdpa", **over}
    if kind == "distilbert":
        cfg = transformers.DistilBertConfig(dim=48, n_layers=2, n_heads=4, hidden_dim=80, **common)
    else:
        cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
               "electra": transformers.ElectraConfig}[kind]
        cfg = cls(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
                  max_position_embeddings=64, **common)
    ref = transformers.AutoModelForSequenceClassification.from_config(cfg).eval()
    return ref, _lm_batch("right")


_distilbert = functools.partial(_encoder_classifier, "distilbert")


def _check_patch(kind, ref, model, batch, op_calls=None, logits=lambda o: o.logits):
    before = _state(model)
    assert hf.patch(model) is model
    assert model._llmcore_patched == EXPECTED[kind]
    assert model.config._attn_implementation == "llmcore"
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    with torch.no_grad():
        torch.testing.assert_close(logits(model(**batch)), logits(ref(**batch)), **FP32)
    if op_calls is not None:  # (the LM-head loss runs only in training with labels)
        # a setting, the LM forward, a class swap, a layer forward
        not_ops = ("attention", "linear_cross_entropy", "embedding", "first_token_layer")
        used = {k for k, n in EXPECTED[kind].items() if n and k not in not_ops}
        assert {k for k, n in op_calls.items() if n} == used


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_patch_causal_lm_plumbing(kind, ref_ops, tmp_path):
    ref, _ = _pair(kind)
    model = copy.deepcopy(ref)
    batch = _lm_batch("right")
    _check_patch(kind, ref, model, batch, ref_ops)

    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    outs = []
    for m in (ref, model):
        m.train()
        outs.append(m(**batch, labels=labels))
        outs[-1].loss.backward()
    assert outs[1].logits is None  # the fused LM-head loss held no logits
    # the base model's cache comes back as transformers' forward returns it (it was dropped: a probe)
    assert type(outs[1].past_key_values) is type(outs[0].past_key_values)  # noqa: E721
    assert outs[0].past_key_values is not None
    torch.testing.assert_close(outs[1].loss, outs[0].loss, **FP32)
    _assert_grads_close(ref, model)
    # switched back to transformers' attention, its forward with its logits (they stayed None: a probe)
    switched = copy.deepcopy(model)
    switched.set_attn_implementation("eager")
    out = switched(**batch, labels=labels)
    assert out.logits is not None and out.logits.shape == outs[0].logits.shape
    torch.testing.assert_close(out.loss, outs[0].loss, **FP32)

    model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_patch_minilm_plumbing(minilm, ref_ops):
    ref, _, batch = minilm
    _check_patch("minilm", ref, copy.deepcopy(ref), batch, ref_ops)


def test_patch_distilbert_plumbing(ref_ops):
    ref, batch = _distilbert()
    _check_patch("distilbert", ref, copy.deepcopy(ref), batch, ref_ops)


def test_patch_leaves_chunked_distilbert_ffn_alone(ref_ops):
    ref, batch = _distilbert(chunk_size_feed_forward=13)  # transformers' memory knob: FFN rows in chunks
    model = hf.patch(copy.deepcopy(ref))
    assert model._llmcore_patched["bias_gelu"] == 0 and model._llmcore_patched["layer_norm"] == 5
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, **FP32)
    assert ref_ops["bias_gelu"] == 0


def test_patch_is_idempotent_and_survives_deepcopy(ref_ops):
    ref, _ = _pair("llama")
    model = hf.patch(copy.deepcopy(ref))
    forwards = {n: m.forward for n, m in model.named_modules() if "forward" in m.__dict__}
    assert hf.patch(model)._llmcore_patched == EXPECTED["llama"]
    assert {n: m.forward for n, m in model.named_modules() if "forward" in m.__dict__} == forwards

    twin = copy.deepcopy(model)
    norm = twin.model.norm
    assert norm.forward.__self__ is norm  # bound to the copy, not to the original
    batch = _lm_batch("none")
    with torch.no_grad():
        torch.testing.assert_close(twin(**batch).logits, ref(**batch).logits, **FP32)


def test_patch_leaves_unknown_modules_alone(ref_ops):
    class MyRMSNorm(nn.Module):  # an RMSNorm this module does not know: e.g. Gemma's uses (1 + weight)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * (1 + self.weight)

    class ScaledLayerNorm(nn.LayerNorm):  # a subclass may change forward
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), MyRMSNorm(), ScaledLayerNorm(8),
                          nn.LayerNorm(8, bias=False), nn.LayerNorm((2, 4)))
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = model[:5](x)
    hf.patch(model)
    assert model._llmcore_patched == {"attention": 0, "layer_norm": 1, "rms_norm": 0, "bias_gelu": 0, "swiglu": 0,
                                      "rotary_embedding": 0, "dropout": 0, "embedding": 0, "linear_cross_entropy": 0,
                                      "first_token_layer": 0}
    assert [("forward" in m.__dict__) for m in model] == [False, True, False, False, False, False]
    with torch.no_grad():
        torch.testing.assert_close(model[:5](x), before, **FP32)


def test_patched_dropout_is_llmcore_dropout():
    """nn.Dropout modules run llmcore.ops.dropout with their p and training flag: in training the mask of llmcore's
    Philox stream for torch's seed, bit for bit (so torch.manual_seed reproduces a step), in evaluation the
    identity; in-place ones are left alone. A patched MiniLM trains reproducibly with its dropout on."""
    model = hf.patch(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3), nn.Dropout(0.3, inplace=True)))
    assert model._llmcore_patched["dropout"] == 1 and "forward" not in model[2].__dict__
    x = torch.randn(64, 256)
    torch.manual_seed(5)
    got = model[1](x)
    torch.manual_seed(5)
    assert torch.equal(got, llmcore.ops.dropout(x, 0.3, True))
    assert 0.25 < (got == 0).float().mean() < 0.35
    model.eval()
    assert torch.equal(model[1](x), x)

    torch.manual_seed(0)
    minilm = hf.patch(transformers.BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)).train()
    assert minilm.config.hidden_dropout_prob == 0.1 and minilm._llmcore_patched["dropout"] == 20
    ids = torch.randint(1000, 2000, (4, 12))
    losses = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        losses.append(minilm(input_ids=ids, labels=torch.tensor([0, 1, 1, 0])).loss)
    assert losses[0] == losses[1] != losses[2]
    losses[0].backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in minilm.parameters())


def test_patched_embeddings_recycle_their_gradient(minilm):
    """nn.Embedding modules become llmcore.nn.Embedding (still nn.Embedding instances): the gradients of two steps
    equal the unpatched model's, the second written into the first's buffer (zero_grad(set_to_none=True) let it go);
    llmcore's Trainer may then update MiniLM's word table row-sparsely, but never a table tied to an LM head."""
    from llmcore.nn import Embedding
    from llmcore.train.lazy_rows import LazyRowAdamW

    ref, _, batch = minilm
    model = hf.patch(copy.deepcopy(ref))
    word = model.bert.embeddings.word_embeddings
    assert type(word) is Embedding and isinstance(word, nn.Embedding)
    labels = torch.tensor([1, 0, 0, 0])
    pointers = []
    for _ in range(2):
        for m in (ref, model):
            m.zero_grad(set_to_none=True)
            m(**batch, labels=labels).loss.backward()
        torch.testing.assert_close(word.weight.grad, ref.bert.embeddings.word_embeddings.weight.grad, **FP32)
        pointers.append(word.weight.grad.data_ptr())
    assert pointers[0] == pointers[1]
    fused = torch.optim.AdamW(model.parameters(), fused=True)
    assert [t.module for t in LazyRowAdamW.attach(model, fused)] == [word]

    gpt2 = hf.patch(_pair("gpt2", vocab_size=5000)[0])  # a table big enough for the row-sparse update
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert LazyRowAdamW.attach(gpt2, torch.optim.AdamW(gpt2.parameters(), fused=True)) == []
    gpt2.lm_head.weight = nn.Parameter(gpt2.lm_head.weight.detach().clone())  # untied: now it qualifies
    assert [t.module for t in LazyRowAdamW.attach(gpt2, torch.optim.AdamW(gpt2.parameters(), fused=True))] == [
        gpt2.transformer.wte]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_patched_forwards_keep_their_signatures(kind):
    """transformers' Trainer keeps the dataset columns inspect.signature(model.forward) names: a patched module's
    forward must show its class's parameters (a bare (*args, **kwargs) made the Trainer drop input_ids)."""
    model = hf.patch(copy.deepcopy(_pair(kind)[0]))
    rebound = [m for m in model.modules() if "forward" in m.__dict__]
    assert model in rebound and len(rebound) >= 5  # the LM-head loss, norms, MLPs or dropout, attention's RoPE
    for m in rebound:
        assert inspect.signature(m.forward) == inspect.signature(type(m).forward.__get__(m)), type(m).__name__


def test_patched_causal_lm_in_transformers_trainer(tmp_path):
    """transformers' Trainer (remove_unused_columns on, a text column to drop) trains a patched GPT-2 as it trains
    the unpatched one: before the patched forward kept its class's signature, it dropped input_ids and failed."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    ref, _ = _pair("gpt2")
    ids = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(2))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "labels": ids.tolist(), "text": ["unused"] * 8})
    runs = []
    for i, model in enumerate((copy.deepcopy(ref), hf.patch(copy.deepcopy(ref)))):
        args = transformers.TrainingArguments(str(tmp_path / str(i)), per_device_train_batch_size=4, max_steps=2,
                                              learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                                              logging_steps=1, seed=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        runs.append((trainer.train().training_loss, model))
    (loss_ref, model_ref), (loss, model) = runs
    assert model._llmcore_patched["linear_cross_entropy"] == 1
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    # Adam moves an element with a near-zero gradient by up to lr on rounding noise: each tensor's difference is
    # held to 1% of how far training moved it
    for (name, a), b in zip(model_ref.named_parameters(), model.parameters()):
        change = (a - ref.get_parameter(name)).norm()
        assert (b - a).norm() <= 0.01 * change, (name, float((b - a).norm()), float(change))


def test_patch_again_after_unpickling():
    """torch.save / torch.load of a whole patched model: pickle brings the rebound forwards back as the classes'
    (the model runs, unfused); patch() binds them again."""
    ref, _ = _pair("llama")
    model = hf.patch(copy.deepcopy(ref))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    norm = back.model.norm
    assert norm.forward.__func__ is type(norm).forward  # transformers' again
    batch = _lm_batch("right")
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, ref(**batch).logits, **FP32)
    assert hf.patch(back)._llmcore_patched == EXPECTED["llama"]
    assert norm.forward.__func__ is not type(norm).forward and norm.forward.__self__ is norm
    rebound = {n for n, m in back.named_modules() if "forward" in m.__dict__}
    assert rebound == {n for n, m in model.named_modules() if "forward" in m.__dict__}
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, ref(**batch).logits, **FP32)


_LOAD_AND_RUN = """
import sys, torch
model = torch.load(sys.argv[1], weights_only=False)
batch = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(**batch).logits, sys.argv[3])
"""


def test_unpickled_in_a_fresh_process(tmp_path):
    """A whole patched model loaded in another process names its attention "llmcore", which that process had not
    registered: its forward raised KeyError (found by a probe). The name is registered as the model loads."""
    ref, _ = _pair("llama")
    torch.save(hf.patch(copy.deepcopy(ref)), tmp_path / "model.pt")
    batch = _lm_batch("right")
    torch.save(dict(batch), tmp_path / "batch.pt")
    done = subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(tmp_path / "model.pt"), str(tmp_path / "batch.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)  # (outside the source tree: the installed package)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), ref(**batch).logits, **FP32)


def test_patch_refuses_a_config_asking_for_attention_weights():
    """output_attentions=True in the config: llmcore attention returns none (GPT-2 dropped the request silently, an
    empty tuple came back); refused before anything is patched."""
    ref, _ = _pair("gpt2")
    model = copy.deepcopy(ref)
    model.set_attn_implementation("eager")  # (transformers itself refuses the setting on its sdpa attention)
    model.config.output_attentions = True
    with pytest.raises(ValueError, match="output_attentions=True"):
        hf.patch(model)
    assert model.config._attn_implementation == "eager"


def test_patch_refuses_soft_capped_attention():
    """Gemma 2's attn_logit_softcapping: patch() went through and every forward then raised (a probe); refused
    before anything is patched, naming the setting."""
    cfg = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    attn_logit_softcapping=50.0)
    model = transformers.Gemma2ForCausalLM(cfg)
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0"):
        hf.patch(model)
    assert model.config._attn_implementation == "eager"
    assert not any(hasattr(m, "_llmcore_fused") for m in model.modules())


def test_gemma3_keeps_a_softcap_setting_it_never_applies():
    """Gemma 3's config may carry attn_logit_softcapping, which its attention keeps and never passes (Gemma 2
    passes it): patch() refused such a model; it patches now, with the eager logits."""
    if not hasattr(transformers, "Gemma3TextConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma 3")
    cfg = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                        attn_logit_softcapping=50.0, sliding_window=8)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        hf.patch(model)
        torch.testing.assert_close(model(ids).logits, want, **FP32)


def test_patch_refuses_attention_sinks():
    """GPT-OSS's attention sinks (passed to the attention function as s_aux): patch() went through and every forward
    then raised (a probe); refused before anything is patched, naming them."""
    cfg = transformers.GptOssConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, intermediate_size=16, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=4, max_position_embeddings=64)
    model = transformers.GptOssForCausalLM(cfg)
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match=r"attention sinks \(GptOssAttention.sinks\)"):
        hf.patch(model)
    assert model.config._attn_implementation == "eager"
    assert not any(hasattr(m, "_llmcore_fused") for m in model.modules())


def _data_parallel_replicas(model, n, monkeypatch):
    """torch's ``replicate()``, as ``nn.DataParallel`` runs it, making ``n`` replicas of ``model`` on this CPU: only
    its broadcast (CUDA's) is stubbed, by copies, replica j's floating tensors shifted by j/100 so that a replica
    computing with another's tensors shows. The rest is torch's: each module copied by its
    ``_replicate_for_data_parallel`` (the replica's __dict__ a copy of the module's), the copied tensors set on them."""
    rep = sys.modules["torch.nn.parallel.replicate"]

    def broadcast(tensors, devices, detach=False):
        return [[(t.detach() if detach else t) + j / 100 if t.is_floating_point() else t.clone() for t in tensors]
                for j in range(len(devices))]
    monkeypatch.setattr(rep, "_broadcast_coalesced_reshape", broadcast)
    return rep.replicate(model, list(range(n)))


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_patched_model_in_data_parallel_replicas(kind, monkeypatch):
    """transformers' Trainer wraps the model in nn.DataParallel on several GPUs without torchrun. Each replica of a
    patched model computes with its own tensors, through llmcore's forwards (the LM-head loss, the first-token
    layer), and its gradients reach the model's parameters: as the unpatched model's replicas. The replicas run at
    once in two threads, as parallel_apply runs them; for the classifier one of them asks for hidden states."""
    from concurrent.futures import ThreadPoolExecutor

    if kind == "llama":
        ref = _pair("llama")[0]
        batch = _lm_batch("right")
        labels = batch["input_ids"]
        extra = [{}, {}]
    else:
        ref, batch = _encoder_classifier("bert", **_NO_DROPOUT["bert"])
        labels = torch.tensor([1, 0, 1])
        extra = [{"output_hidden_states": True}, {}]
    model = hf.patch(copy.deepcopy(ref))
    shapes = []  # the first-token computations' outputs (a function in the layer's __dict__: the replicas call it
    # on themselves; a hook would turn it off, a wrapped forward run the original's tensors)
    if kind == "bert":
        layer, fn = _last_layer(model), _last_layer(model)._llmcore_first_token_fn

        def recorded(self, *args):
            out = fn(self, *args)
            shapes.append(tuple(out.shape))
            return out

        layer._llmcore_first_token_fn = recorded
    calls = []
    for m in (ref, model):
        m.train()
        replicas = _data_parallel_replicas(m, 2, monkeypatch)
        with ThreadPoolExecutor(2) as pool:
            outs = list(pool.map(lambda r, kw: r(**batch, labels=labels, **kw), replicas, extra))
        (outs[0].loss + outs[1].loss).backward()
        calls.append(outs)
    (ref0, ref1), (out0, out1) = calls
    assert not torch.allclose(ref0.logits, ref1.logits, atol=1e-3)  # the replicas' tensors differ
    for out, out_ref in ((out0, ref0), (out1, ref1)):
        torch.testing.assert_close(out.loss, out_ref.loss, **FP32)
        if kind == "llama":
            assert out.logits is None  # the LM-head loss ran fused, on the replica's tensors
        else:
            torch.testing.assert_close(out.logits, out_ref.logits, **FP32)
    _assert_grads_close(ref, model)
    if kind == "bert":  # the replica asked for hidden states ran its last layer whole, the other on row 0
        assert out0.hidden_states[-1].shape == (3, 13, 48) and shapes == [(3, 1, 48)]


def test_patched_minilm_in_llmcore_trainer(minilm, tmp_path, monkeypatch):
    """llmcore's Trainer on a patched MiniLM (its word table now updated row-sparsely by LazyRowAdamW) ends where it
    ends on the unpatched model, to the fused kernels' rounding."""
    from llmcore.train import TrainConfig, Trainer
    from llmcore.train.lazy_rows import LazyRowAdamW

    attached = []
    attach = LazyRowAdamW.attach
    monkeypatch.setattr(LazyRowAdamW, "attach", lambda *a, **kw: attached.append(attach(*a, **kw)) or attached[-1])
    ref, _, batch = minilm
    batches = [{**batch, "labels": torch.tensor(labels)} for labels in ([1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0])]
    models = [copy.deepcopy(ref), hf.patch(copy.deepcopy(ref))]
    for i, m in enumerate(models):
        cfg = TrainConfig(str(tmp_path / str(i)), num_train_epochs=1, learning_rate=1e-4, warmup_steps=0,
                          weight_decay=0.01, save_strategy="no", logging_steps=1, disable_tqdm=True)
        Trainer(m, cfg, lambda epoch: batches).train()
    assert [len(a) for a in attached] == [0, 1]  # transformers' nn.Embedding: none; once patched, the word table
    # Adam divides by the gradient's running magnitude: an element whose gradient is ~0 moves by up to lr on
    # rounding noise alone, so each tensor's difference is held to 1% of how far training moved it. The key biases
    # have no gradient in exact arithmetic (softmax ignores a shift of a query's scores): their steps are noise.
    moved = 0
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        if name.endswith("attention.self.key.bias"):
            continue
        change = (a - ref.get_parameter(name)).norm()
        assert (b - a).norm() <= 0.01 * change, (name, float((b - a).norm()), float(change))
        moved += bool(change > 0)
    assert moved > 50


@pytest.mark.parametrize("kind", ["gpt2", "minilm"])
def test_trainer_checkpoints_and_resumes_transformers_models(kind, minilm, tmp_path):
    """llmcore's Trainer saves a transformers model with its own save_pretrained (checkpoints, the best model,
    save_model) and resumes from such a checkpoint bit for bit: GPT-2 (its LM head tied to wte, which
    save_pretrained drops) and MiniLM with a new classification head, both patched."""
    from llmcore.train import TrainConfig, Trainer

    if kind == "minilm":
        start, _, batch = minilm
        batches = [{**batch, "labels": torch.tensor(y)} for y in ([1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0])]
    else:
        start = _pair("gpt2")[0]
        batch = _lm_batch("right")
        batches = [{**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}] * 3

    def run(out, **kw):
        cfg = TrainConfig(str(tmp_path / out), max_steps=5, learning_rate=1e-3, warmup_steps=0, logging_steps=1,
                          eval_strategy="steps", eval_steps=2, metric_for_best_model="eval_loss",
                          greater_is_better=False, disable_tqdm=True, **kw)
        trainer = Trainer(hf.patch(copy.deepcopy(start)), cfg, lambda epoch: batches, eval_batches=batches[:1])
        trainer.train()
        return trainer

    straight = run("a", save_strategy="steps", save_steps=2, load_best_model_at_end=True)
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()
    if kind == "gpt2":
        from safetensors.torch import load_file

        assert "lm_head.weight" not in load_file(str(ckpt / "model.safetensors"))  # tied: dropped, restored on load
    resumed = run("a", save_strategy="no", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert [r["loss"] for r in resumed.log_history if "loss" in r] == \
        [r["loss"] for r in straight.log_history if "loss" in r]
    straight.save_model(str(tmp_path / "final"))
    auto = transformers.AutoModelForCausalLM if kind == "gpt2" else transformers.AutoModelForSequenceClassification
    back = auto.from_pretrained(str(tmp_path / "final"), attn_implementation="sdpa")
    for name, t in straight.model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    assert straight.best_model_checkpoint is not None


def test_transformers_checkpoint_errors():
    """A transformers model's checkpoint with a tensor it lacks, or without one it has (and that is not tied to a
    present one), is refused with the names."""
    from llmcore.models import CheckpointError
    from llmcore.models.loading import load_transformers_state

    model = _pair("gpt2")[0]
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    load_transformers_state(model, state)  # the tied head may be absent
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*GPT2LMHeadModel.*extra\.weight"):
        load_transformers_state(model, {**state, "extra.weight": torch.zeros(1)})
    del state["transformer.ln_f.weight"]
    with pytest.raises(CheckpointError, match=r"missing .*transformer\.ln_f\.weight"):
        load_transformers_state(model, state)


def test_patch_skips_intermediate_with_other_activation(ref_ops):
    hf.register()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=48, hidden_act="relu")
    model = hf.patch(transformers.BertModel(cfg))
    assert model._llmcore_patched["bias_gelu"] == 0 and model._llmcore_patched["layer_norm"] == 3


def test_patched_intermediate_falls_back_when_dense_is_wrapped(minilm, ref_ops):
    ref, _, batch = minilm
    model = hf.patch(copy.deepcopy(ref))
    seen = []
    model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, **FP32)
    assert seen == [1]  # the hook ran: the module's own forward was used
    assert ref_ops["bias_gelu"] == 5


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_fused_modules_run_their_hooks_and_a_swapped_activation(kind):
    """Found by a probe: a full backward hook on a fused MLP's linear layer or on a causal LM's head, a global module
    hook, or any hook on the MLP's activation did not fire after patch() (only the linear layers' own forward hooks
    were checked), and an activation swapped in after patch() was ignored (GPT-2's MLP with ReLU: 0.78 off). Each now
    makes the fused forward call the module, as transformers does."""
    torch.manual_seed(0)
    if kind == "bert":
        ref = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).train()
        mlp, linear, act, head = "bert.encoder.layer.0.intermediate", "dense", "intermediate_act_fn", "cls"
    else:
        ref = _pair(kind)[0].train()
        mlp, linear, act, head = {"gpt2": ("transformer.h.0.mlp", "c_fc", "act", "lm_head"),
                                  "llama": ("model.layers.0.mlp", "gate_proj", "act_fn", "lm_head")}[kind]
    model = hf.patch(copy.deepcopy(ref))
    batch = _lm_batch("right")
    labels = batch["input_ids"]
    for path in (f"{mlp}.{linear}", f"{mlp}.{act}", head):
        for how in ("backward", "global", "forward"):
            calls = []
            for m in (ref, model):
                seen = []
                target = m.get_submodule(path)
                if how == "backward":
                    handle = target.register_full_backward_hook(lambda *a, seen=seen: seen.append(1))
                elif how == "global":
                    handle = nn.modules.module.register_module_forward_hook(
                        lambda mod, args, out, seen=seen, target=target: seen.append(1) if mod is target else None)
                else:
                    handle = target.register_forward_hook(lambda *a, seen=seen: seen.append(1))
                try:
                    m(**batch, labels=labels).loss.backward()
                finally:
                    handle.remove()
                calls.append(len(seen))
            assert calls[0] == calls[1] > 0, (path, how, calls)
    for m in (ref, model):  # another activation, swapped in after patching
        setattr(m.get_submodule(mlp), act, nn.ReLU())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, **FP32)


def test_patch_warns_about_missing_ops(monkeypatch):
    for name in FUSED_OPS:
        monkeypatch.delattr(llmcore.ops, name, raising=False)
    ref, _ = _pair("llama")
    with pytest.warns(UserWarning, match="rms_norm, rotary_embedding, swiglu"):
        model = hf.patch(copy.deepcopy(ref))
    assert model._llmcore_patched == {"attention": 2, "layer_norm": 0, "rms_norm": 0, "bias_gelu": 0, "swiglu": 0,
                                      "rotary_embedding": 0, "dropout": 0, "embedding": 1, "linear_cross_entropy": 1,
                                      "first_token_layer": 0}


@pytest.fixture
def rotary_calls(monkeypatch):
    """Counts the calls of llmcore.ops.rotary_embedding (the real op runs)."""
    calls = []
    real = llmcore.ops.rotary_embedding

    def counted(x, cos, sin, **kw):
        calls.append((x.dtype, cos.dtype))
        return real(x, cos, sin, **kw)

    monkeypatch.setattr(llmcore.ops, "rotary_embedding", counted)
    return calls


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_patch_fuses_rope_and_leaves_transformers_alone(kind, rotary_calls):
    """The patched attention modules run transformers' forward with llmcore's rotary kernel for its RoPE: loss and
    gradients as transformers' (fp32); the modeling module's apply_rotary_pos_emb, the class's forward and a model
    not patched are unchanged."""
    ref, _ = _pair(kind)
    module = sys.modules[type(ref).__module__]
    original = module.apply_rotary_pos_emb
    attention_cls = type(ref.model.layers[0].self_attn)
    class_forward = attention_cls.forward
    model = hf.patch(copy.deepcopy(ref))
    assert model._llmcore_patched["rotary_embedding"] == 2
    assert module.apply_rotary_pos_emb is original and attention_cls.forward is class_forward
    batch = _lm_batch("right")
    with torch.no_grad():
        copy.deepcopy(ref)(**batch)  # not patched
    assert rotary_calls == []

    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for m in (ref, model):
        m.train()
    out_ref, out = ref(**batch, labels=labels), model(**batch, labels=labels)
    assert rotary_calls == [(torch.float32, torch.float32)] * 4  # q and k of 2 layers
    torch.testing.assert_close(out.loss, out_ref.loss, **FP32)
    out_ref.loss.backward(), out.loss.backward()
    _assert_grads_close(ref, model)


def test_patched_rope_under_autocast_and_in_generation(rotary_calls):
    """Under bf16 autocast transformers' RoPE gets float32 cos / sin and bf16 q / k (its result float32, rounded
    to bf16 by the attention): the kernel takes them and rounds once; the loss stays within bf16 rounding of
    transformers'. Greedy generation with a cache (decode steps of one position, left padding) gives the same
    tokens."""
    ref, _ = _pair("llama")
    model = hf.patch(copy.deepcopy(ref))
    batch = _lm_batch("right")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = model(**batch, labels=batch["input_ids"]).loss, ref(**batch, labels=batch["input_ids"]).loss
    assert rotary_calls == [(torch.bfloat16, torch.float32)] * 4
    torch.testing.assert_close(got, want, atol=0.02, rtol=0.01)

    rotary_calls.clear()
    batch = _lm_batch("left", length=6)
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    torch.testing.assert_close(model.generate(**batch, **kw), ref.generate(**batch, **kw), atol=0, rtol=0)
    assert len(rotary_calls) == 2 * 2 * 5  # q and k, 2 layers, prefill + 4 decode steps


def test_fused_rope_matches_transformers_and_falls_back(rotary_calls):
    """_fused_rotary_pos_emb against transformers' apply_rotary_pos_emb on real angles (LlamaRotaryEmbedding):
    fp32 to rounding, bf16 no further from float64 than transformers' (one rounding, not four); calls the kernel
    does not take -- another unsqueeze_dim, a dtype mix outside autocast -- run transformers' function itself."""
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb
    fused = functools.partial(hf._fused_rotary_pos_emb, original)
    cfg = _config("llama", max_position_embeddings=4096)
    B, L, H, D = 2, 37, 4, 16
    positions = torch.arange(L).expand(B, L) + torch.tensor([[0], [1500]])  # far positions: large angles
    g = torch.Generator().manual_seed(0)
    q64, k64 = (torch.randn(B, L, h, D, generator=g, dtype=torch.float64).transpose(1, 2) for h in (H, 2))
    rope = modeling_llama.LlamaRotaryEmbedding(cfg)
    cos, sin = rope(q64.float(), positions)
    want_q, want_k = original(q64, k64, cos.double(), sin.double())
    for dtype, rtol in ((torch.float32, 1e-6), (torch.bfloat16, None)):
        q, k = q64.to(dtype), k64.to(dtype)
        got, ref = fused(q, k, cos.to(dtype), sin.to(dtype)), original(q, k, cos.to(dtype), sin.to(dtype))
        for a, b, truth in zip(got, ref, (want_q, want_k)):
            assert a.dtype == dtype and a.shape == truth.shape
            if rtol is not None:
                torch.testing.assert_close(a, b, atol=rtol, rtol=rtol)
            else:
                assert (a.double() - truth).abs().max() <= (b.double() - truth).abs().max()
    assert len(rotary_calls) == 4

    rotary_calls.clear()
    q, k = q64.float(), k64.float()
    by_positions = fused(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2)
    mixed = fused(q.to(torch.bfloat16), k.to(torch.bfloat16), cos, sin)  # float32 angles, no autocast
    assert rotary_calls == []
    for got, want in ((by_positions, original(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2)),
                      (mixed, original(q.to(torch.bfloat16), k.to(torch.bfloat16), cos, sin))):
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_patched_rope_under_torch_compile():
    """torch.compile traces the patched attention's forward with the fused RoPE (the copy's globals are a scope
    of their own: dynamo would read a module's, where apply_rotary_pos_emb is transformers')."""
    ref, _ = _pair("llama")
    model = hf.patch(copy.deepcopy(ref))
    batch = _lm_batch("none")
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    with torch.no_grad():
        got = torch.compile(model, backend=backend)(**batch).logits
        torch.testing.assert_close(got, ref(**batch).logits, **FP32)
    assert targets.count("llmcore.rotary.default") == 4  # q and k, 2 layers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu/run.sh runs it there)")
@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen3", "minilm"])
def test_patch_on_cuda_bf16(kind, request):
    """On a GPU, bf16 weights: the patched model (Triton attention, norms, RoPE, LM-head loss; torch's dropout and
    embedding) trains as transformers' sdpa model does: loss, and the gradients of the embedding table and of the
    last layer's q projection, within bf16 rounding."""
    if kind == "minilm":  # (the fixture asked for here alone: the other models need no MiniLM package)
        ref, _, batch = request.getfixturevalue("minilm")
        ref = copy.deepcopy(ref)
        labels = torch.tensor([1, 0, 0, 1])
    else:
        ref = _pair(kind)[0]
        batch = _lm_batch("right")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    ref = ref.to("cuda", torch.bfloat16).train()
    model = hf.patch(copy.deepcopy(ref))
    batch = {k: v.cuda() for k, v in batch.items()}
    want, got = ref(**batch, labels=labels.cuda()), model(**batch, labels=labels.cuda())
    assert abs(float(got.loss) - float(want.loss)) <= 0.02 * abs(float(want.loss)) + 0.01
    want.loss.backward(), got.loss.backward()
    names = [n for n, _ in ref.named_parameters()]
    picks = [n for n in names if "embed" in n or "wte" in n][:1] + [n for n in names if "q_proj.weight" in n or
                                                                   "query.weight" in n or "c_attn.weight" in n][-1:]
    assert len(picks) == 2, names
    for name in picks:
        a, b = ref.get_parameter(name).grad.float(), model.get_parameter(name).grad.float()
        assert (b - a).norm() <= 0.05 * a.norm(), (name, float((b - a).norm()), float(a.norm()))


def _doubled(x):
    return 2 * x


def test_with_global_copies_through_wraps_decorators():
    def add_one(f):
        @functools.wraps(f)
        def wrapper(x):
            return f(x) + 1
        return wrapper

    @add_one
    def calls_doubled(x):
        return _doubled(x)

    def reads_attribute(x):
        return x._doubled

    copy_ = hf._with_global(calls_doubled, "_doubled", lambda x: 3 * x)
    assert copy_(5) == 16 and calls_doubled(5) == 11 and _doubled(5) == 10
    assert copy_.__name__ == calls_doubled.__name__ and copy_.__wrapped__ is not calls_doubled.__wrapped__
    assert hf._with_global(calls_doubled, "_tripled", abs) is None
    assert hf._with_global(reads_attribute, "_doubled", abs) is None


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_patched_lm_loss_follows_transformers(kind):
    """The fused LM-head loss against transformers' ForCausalLMLoss on the same model: num_items_in_batch (sum /
    n), shift_labels as given, ignored labels, bf16 weights (a float32 loss, as transformers returns), and every
    case it leaves to transformers' forward (evaluation, no labels) returns its logits."""
    ref, _ = _pair(kind)
    model = hf.patch(copy.deepcopy(ref))
    batch = _lm_batch("right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[0, :3] = -100  # a prompt
    shift = torch.randint(0, 96, labels.shape, generator=torch.Generator().manual_seed(3))
    shift[1, ::2] = -100
    for extra in ({}, {"num_items_in_batch": 17}, {"num_items_in_batch": torch.tensor(17)}, {"shift_labels": shift}):
        for m in (ref, model):
            m.train()
            m.zero_grad(set_to_none=True)
        want = ref(**batch, labels=labels, **extra)
        got = model(**batch, labels=labels, **extra)
        assert got.logits is None
        torch.testing.assert_close(got.loss, want.loss, **FP32)
        want.loss.backward(), got.loss.backward()
        _assert_grads_close(ref, model)
    with torch.no_grad():
        for kw in ({"labels": labels}, {}):
            ref.eval(), model.eval()
            torch.testing.assert_close(model(**batch, **kw).logits, ref(**batch, **kw).logits, **FP32)
            ref.train(), model.train()
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, **FP32)  # training, no labels
        assert model(**batch, logits_to_keep=2).logits.shape[1] == 2
    half, half_ref = copy.deepcopy(model).to(torch.bfloat16), copy.deepcopy(ref).to(torch.bfloat16)
    got, want = half(**batch, labels=labels), half_ref(**batch, labels=labels)
    assert got.loss.dtype == want.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, want.loss, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_patched_lm_loss_without_loss_tokens_keeps_the_model(kind):
    """A window whose labels are all -100 (a prompt-masked text truncated before its answer) gets
    num_items_in_batch 0 from transformers' Trainer: the loss is nan and every gradient 0 there; the patched model's
    gradients were nan, and one optimizer step made every weight nan (a probe)."""
    ref, _ = _pair(kind)
    model = hf.patch(copy.deepcopy(ref))
    batch = _lm_batch("right")
    labels = torch.full_like(batch["input_ids"], -100)
    for m in (ref, model):
        m.train()
        out = m(**batch, labels=labels, num_items_in_batch=torch.tensor(0))
        assert out.loss.isnan()
        out.loss.backward()
        assert all(p.grad is None or (p.grad == 0).all() for p in m.parameters()), type(m).__name__


def test_patched_lm_loss_falls_back_for_a_custom_loss_or_wrapped_head():
    ref, _ = _pair("llama")
    model = hf.patch(copy.deepcopy(ref)).train()
    batch = _lm_batch("none")
    labels = batch["input_ids"]
    seen = []
    model.lm_head.register_forward_hook(lambda *a: seen.append(1))
    assert model(**batch, labels=labels).logits is not None and seen == [1]
    model2 = hf.patch(copy.deepcopy(ref)).train()
    model2.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean() * 0 + 7.0
    assert float(model2(**batch, labels=labels).loss) == 7.0


def test_patched_hf_lm_in_llmcore_trainer_matches_unpatched():
    """llmcore's Trainer with a patched transformers Llama: uneven micro-batches give the unpatched model's
    gradients (the loop passes num_items_in_batch, which the fused loss divides by)."""
    from llmcore.train import accumulate_gradients

    ref, _ = _pair("llama")
    model = hf.patch(copy.deepcopy(ref))
    batch = _lm_batch("right")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    micro = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 1), slice(1, 3))]
    for m in (ref, model):
        m.train()
        m.zero_grad(set_to_none=True)
    loss_ref, _ = accumulate_gradients(ref, micro)
    loss, _ = accumulate_gradients(model, micro)
    torch.testing.assert_close(loss, loss_ref, **FP32)
    _assert_grads_close(ref, model)


# ---------------------------------------------------------------------------------------
# patch(): llmcore's own fused ops


def _require_fused_ops():
    missing = [n for n in FUSED_OPS if not hasattr(llmcore.ops, n)]
    if missing:
        pytest.skip(f"llmcore.ops does not export {', '.join(missing)} yet")


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_patch_causal_lm_with_fused_ops(kind):
    _require_fused_ops()
    ref, _ = _pair(kind)
    model = copy.deepcopy(ref)
    batch = _lm_batch("right")
    _check_patch(kind, ref, model, batch)

    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    outs = []
    for m in (ref, model):
        m.train()
        outs.append(m(**batch, labels=labels))
        outs[-1].loss.backward()
    assert outs[1].logits is None  # the fused LM-head loss held no logits
    torch.testing.assert_close(outs[1].loss, outs[0].loss, **FP32)
    _assert_grads_close(ref, model)

    ref.eval(), model.eval()
    err_sdpa, err_ours = _bf16_errors(ref, model, batch)
    assert err_ours <= 2 * err_sdpa + 1e-2, (err_ours, err_sdpa)


def test_patch_minilm_with_fused_ops(minilm):
    _require_fused_ops()
    ref, _, batch = minilm
    model = copy.deepcopy(ref)
    _check_patch("minilm", ref, model, batch)
    with torch.no_grad():
        hs, hs_ref = model(**batch, output_hidden_states=True), ref(**batch, output_hidden_states=True)
    _assert_hidden_close(hs, hs_ref, batch["attention_mask"])

    ref_t, model_t = copy.deepcopy(ref), copy.deepcopy(model)
    labels = torch.tensor([1, 0, 0, 0])
    for m in (ref_t, model_t):
        m.train()
        m(**batch, labels=labels).loss.backward()
    _assert_grads_close(ref_t, model_t)

    err_sdpa, err_ours = _bf16_errors(ref, model, batch)
    assert err_ours <= 2 * err_sdpa + 1e-2, (err_ours, err_sdpa)


def test_patch_distilbert_with_fused_ops():
    _require_fused_ops()
    # without dropout in training: llmcore's masks are not torch's random stream
    ref, batch = _distilbert(dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
    model = copy.deepcopy(ref)
    _check_patch("distilbert", ref, model, batch)

    labels = torch.tensor([1, 0, 1])
    for m in (ref, model):
        m.train()
        m(**batch, labels=labels).loss.backward()
    _assert_grads_close(ref, model)

    ref.eval(), model.eval()
    err_sdpa, err_ours = _bf16_errors(ref, model, batch)
    assert err_ours <= 2 * err_sdpa + 1e-2, (err_ours, err_sdpa)


# ---------------------------------------------------------------------------------------
# patch(): sequence classifiers' last layer on the first token

_NO_DROPOUT = {"bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
               "distilbert": {"dropout": 0.0, "attention_dropout": 0.0, "seq_classif_dropout": 0.0}}
_NO_DROPOUT["roberta"] = _NO_DROPOUT["electra"] = _NO_DROPOUT["bert"]


def _last_layer(model):
    return (model.distilbert.transformer if hasattr(model, "distilbert") else model.base_model.encoder).layer[-1]


def _recording(module, record):
    """``record(output)`` at each call of ``module``, by wrapping its forward: a hook would turn the first-token
    layer off (a user's hook must see every row)."""
    forward = module.forward

    def recorded(*args, **kwargs):
        out = forward(*args, **kwargs)
        record(out)
        return out

    module.forward = recorded


def _output_shapes(model):
    """The shapes the model's last encoder layer returns, call by call."""
    shapes = []
    _recording(_last_layer(model), lambda out: shapes.append(tuple(out.shape)))
    return shapes


def _train_grads(model, batch, labels, **kw):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=labels, **kw)
    out.loss.backward()
    return out, _grads(model)


@pytest.mark.parametrize("kind", ["bert", "roberta", "electra", "distilbert"])
def test_first_token_last_layer_matches_transformers(kind):
    """The classifier's last layer computes row 0 only ((B, 1, H) out), and logits, loss and every gradient are
    transformers' (the padded batch checks the mask's first-query row); a call that returns hidden states or
    attentions runs the whole layer."""
    ref, batch = _encoder_classifier(kind, **_NO_DROPOUT[kind])
    model = hf.patch(copy.deepcopy(ref))
    assert model._llmcore_patched["first_token_layer"] == 1
    shapes = _output_shapes(model)
    labels = torch.tensor([1, 0, 1])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, **FP32)
    out_ref, grads_ref = _train_grads(ref, batch, labels)
    out, grads = _train_grads(model, batch, labels)
    assert shapes == [(3, 1, 48)] * 2
    torch.testing.assert_close(out.loss, out_ref.loss, **FP32)
    assert grads.keys() == grads_ref.keys()
    _assert_grads_close(ref, model)

    model.eval(), ref.eval()
    with torch.no_grad():
        hs, hs_ref = model(**batch, output_hidden_states=True), ref(**batch, output_hidden_states=True)
    assert shapes[-1] == (3, 13, 48) and hs.hidden_states[-1].shape == (3, 13, 48)
    _assert_hidden_close(hs, hs_ref, batch["attention_mask"])
    with pytest.warns(UserWarning, match="attention weights"), torch.no_grad():
        model(**batch, output_attentions=True)  # (llmcore returns no weights: it says so)
    assert shapes[-1] == (3, 13, 48)
    model.config.output_hidden_states = True  # the config's default counts too
    with torch.no_grad():
        model(**batch)
    assert shapes[-1] == (3, 13, 48)
    model.config.output_hidden_states = False
    with torch.no_grad():
        model(**batch)
        model.base_model(**batch)  # the base model alone: every row, as transformers computes them
    assert shapes[-2:] == [(3, 1, 48), (3, 13, 48)]


def test_first_token_last_layer_with_a_per_query_mask():
    """A caller's 4D mask whose first query row differs from the others: the first-token layer takes that row."""
    ref, batch = _encoder_classifier("bert")
    model = hf.patch(copy.deepcopy(ref))
    shapes = _output_shapes(model)
    n = batch["input_ids"].shape[1]
    allowed = torch.ones(3, 1, n, n, dtype=torch.bool)
    allowed[:, :, 0, 5:] = False  # the first query sees the first 5 keys; the others see all
    mask = torch.zeros(3, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        logits, logits_ref = model(batch["input_ids"], attention_mask=mask).logits, ref(batch["input_ids"],
                                                                                       attention_mask=mask).logits
        assert not torch.allclose(logits_ref, ref(batch["input_ids"]).logits, atol=1e-2)  # the mask matters
    torch.testing.assert_close(logits, logits_ref, **FP32)
    assert shapes == [(3, 1, 48)]


@pytest.mark.parametrize("where", ["bert.encoder.layer.1", "bert.encoder.layer.1.output.dense", "bert.encoder",
                                   "bert", "global", "backward"])
def test_first_token_layer_stays_whole_for_a_users_hook(where):
    """A forward hook on the last layer, on a module in it or between it and the classifier, a global module hook, or
    a backward hook there, sees every row, as without the patch (it saw the first-token layer's (B, 1, H) rows)."""
    ref, batch = _encoder_classifier("bert", **_NO_DROPOUT["bert"])
    model = hf.patch(copy.deepcopy(ref))
    seen = {"ref": [], "patched": []}

    def hook(key):
        return lambda m, args, out: seen[key].append(tuple(getattr(out, "last_hidden_state", out).shape))

    if where == "global":
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, args, out: seen["patched"].append(tuple(out.shape)) if m is _last_layer(model) else None)
        seen["ref"] = [(3, 13, 48)]
    elif where == "backward":
        handle = _last_layer(model).register_full_backward_hook(
            lambda m, gin, gout: seen["patched"].append(tuple(gout[0].shape)))
        seen["ref"] = [(3, 13, 48)]
    else:
        for key, m in (("ref", ref), ("patched", model)):
            handle = m.get_submodule(where).register_forward_hook(hook(key))
    try:
        out = model(**batch, labels=torch.tensor([1, 0, 1]))
        out.loss.backward()
        with torch.no_grad():
            torch.testing.assert_close(out.logits, ref(**batch).logits, **FP32)
            if where not in ("global", "backward"):
                ref(**batch)
    finally:
        handle.remove()
    assert seen["patched"] and seen["patched"][:1] == seen["ref"][:1], seen
    assert hf._first_token_layer(model) is not None  # (once the hook is gone, the layer computes one row again)


def test_first_token_switch_is_the_calling_threads():
    """The switch a classifier call sets on its last layer is that thread's: another thread's call through the same
    layer while it is on (the base model alone: feature extraction; or a call returning hidden states) computes every
    row. It was the layer's: such calls got (B, 1, H) hidden states (100 of 100 with a classifier looping in a second
    thread). The other thread's call in flight is set up here as its classifier forward leaves the layer."""
    import threading

    ref, batch = _encoder_classifier("bert", **_NO_DROPOUT["bert"])
    model = hf.patch(copy.deepcopy(ref)).eval()
    other = threading.Thread(target=lambda: None)
    other.start()
    other.join()
    _last_layer(model)._llmcore_first_token = other.ident  # (thread `other`'s classifier call, on)
    shapes = _output_shapes(model)
    with torch.no_grad():
        got, want = model.bert(**batch).last_hidden_state, ref.bert(**batch).last_hidden_state
        torch.testing.assert_close(got, want, **FP32)
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, **FP32)
    assert shapes == [(3, 13, 48), (3, 1, 48)]  # (this thread's own classifier call: the first token)


def test_first_token_layer_stays_whole_once_layers_follow_it():
    """A layer appended after patch() makes the patched one an inner layer again: it computes every row."""
    ref, batch = _encoder_classifier("bert")
    model = hf.patch(copy.deepcopy(ref))
    inner = model.bert.encoder.layer[-1]
    for m in (ref, model):
        m.bert.encoder.layer.append(copy.deepcopy(ref.bert.encoder.layer[0]))
    shapes = []
    inner.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, **FP32)
    assert shapes == [(3, 13, 48)]


class _MeanPool(nn.Module):
    """A head (or BERT pooler) reading every token: the mean over the sequence."""

    def __init__(self, hidden, out, act=None):
        super().__init__()
        self.dense, self.act = nn.Linear(hidden, out), act or nn.Identity()

    def forward(self, x):
        return self.act(self.dense(x.mean(dim=1)))


@pytest.mark.parametrize("kind", ["bert", "roberta", "electra"])
def test_first_token_layer_stays_whole_for_a_head_reading_every_token(kind):
    """A head (BERT: its pooler) swapped for one that reads every token, before or after patch(), or hooked (a hook
    sees its input), gets every row: transformers' logits (it got the (B, 1, H) row 0 and gave wrong ones)."""
    ref, batch = _encoder_classifier(kind, **_NO_DROPOUT[kind])
    where, name = ("bert", "pooler") if kind == "bert" else ("", "classifier")
    hidden, labels = ref.config.hidden_size, ref.config.num_labels

    def swap(m, head):
        setattr(m.get_submodule(where), name, copy.deepcopy(head))
        return m

    head = _MeanPool(hidden, hidden, nn.Tanh()) if kind == "bert" else _MeanPool(hidden, labels)
    swapped_ref = swap(copy.deepcopy(ref), head)
    before = hf.patch(copy.deepcopy(swapped_ref))  # swapped before patch(): the layer is not bound
    after = hf.patch(copy.deepcopy(ref))
    assert before._llmcore_patched["first_token_layer"] == 0 and after._llmcore_patched["first_token_layer"] == 1
    shapes = _output_shapes(swap(after, head))
    with torch.no_grad():
        expected = swapped_ref(**batch).logits
        torch.testing.assert_close(before(**batch).logits, expected, **FP32)
        torch.testing.assert_close(after(**batch).logits, expected, **FP32)
    assert shapes == [(3, 13, 48)]

    hooked = hf.patch(copy.deepcopy(ref))
    shapes, seen = _output_shapes(hooked), []
    getattr(hooked.get_submodule(where), name).register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    with torch.no_grad():
        torch.testing.assert_close(hooked(**batch).logits, ref(**batch).logits, **FP32)
    assert shapes == [(3, 13, 48)] and seen == [(3, 13, 48)]


def test_first_token_last_layer_leaves_packed_rows_whole():
    """Packed sequences in one row (FlashAttention's cu_seq_lens kwargs, as DataCollatorWithFlattening makes): row 0
    is only the first sequence's first token, so the layer runs whole, and the logits are transformers' for the
    first sequence (what its pooler reads), as without the patch's first-token layer."""
    ref, _ = _encoder_classifier("bert")
    model = hf.patch(copy.deepcopy(ref))
    shapes = _output_shapes(model)
    ids, _, fa, lengths = _packed()
    with torch.no_grad():
        logits = model(ids, **fa).logits
        torch.testing.assert_close(logits, ref(ids[:, :lengths[0]]).logits, **FP32)
    assert shapes == [(1, ids.shape[1], 48)]


def test_first_token_last_layer_under_activation_checkpointing():
    """Checkpointed layers recompute in the backward what their forward computed: transformers' checkpointing
    (re-entrant or not) and torch's checkpoint wrapper (FSDP's) give the un-checkpointed gradients, also when a
    whole-layer call without gradients came between the forward and the backward."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    ref, batch = _encoder_classifier("bert", **_NO_DROPOUT["bert"])
    labels = torch.tensor([1, 0, 1])
    _, expected = _train_grads(hf.patch(copy.deepcopy(ref)), batch, labels)
    for how in ("reentrant", "non-reentrant", "wrapper"):
        model = hf.patch(copy.deepcopy(ref))
        if how == "wrapper":
            apply_activation_checkpointing(model, check_fn=lambda m: type(m).__name__ == "BertLayer")
        else:
            # transformers >= 5's name, else the older one
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": how == "reentrant"})
        shapes = _output_shapes(model)
        # the last layer's query projection (unfused: a wrapped forward changes no numbers): the forward, the
        # whole-layer call, and the backward's recomputation
        runs = []
        _recording(_last_layer(model).attention.self.query, lambda out: runs.append(out.shape[1]))
        model.train()
        model.zero_grad(set_to_none=True)
        loss = model(**batch, labels=labels).loss
        with torch.no_grad():
            model(**batch, output_hidden_states=True)
        loss.backward()
        assert shapes[:2] == [(3, 1, 48), (3, 13, 48)], how  # (then the recomputation's)
        assert runs == [1, 13, 1], how  # (transformers' checkpointing left the first-token layer un-checkpointed)
        grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()
                 if p.grad is not None}
        assert grads.keys() == expected.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, expected[name], atol=0, rtol=0, msg=f"{how} {name}")
        # a training call returning hidden states checkpoints and recomputes the whole layer
        out, _ = _train_grads(model, batch, labels, output_hidden_states=True)
        assert out.hidden_states[-1].shape == (3, 13, 48)


def test_first_token_last_layer_under_torch_compile():
    """torch.compile takes the patched classifier without a graph break (llmcore's embedding leaves its gradient
    buffer to the compiled graph) and trains it as eagerly."""
    import torch._dynamo

    ref, batch = _encoder_classifier("bert", **_NO_DROPOUT["bert"])
    labels = torch.tensor([1, 0, 1])
    eager = hf.patch(copy.deepcopy(ref))
    out_eager, grads_eager = _train_grads(eager, batch, labels)
    model = hf.patch(copy.deepcopy(ref))
    shapes = _output_shapes(model)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**batch, labels=labels)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    model.train()
    out = compiled(**batch, labels=labels)
    out.loss.backward()
    assert (3, 1, 48) in shapes
    torch.testing.assert_close(out.logits, out_eager.logits, **FP32)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_eager[name], atol=1e-6, rtol=1e-5, msg=name)


def test_first_token_last_layer_only_where_the_head_reads_one_row(tmp_path):
    """Base models, token classifiers, decoders with cross-attention keep whole layers; an unpickled classifier
    binds the first-token forwards again when patched."""
    ref, batch = _encoder_classifier("bert")
    base = hf.patch(copy.deepcopy(ref.bert))
    tokens = hf.patch(transformers.BertForTokenClassification(ref.config))
    cross = transformers.BertConfig(**{**ref.config.to_dict(), "is_decoder": True, "add_cross_attention": True})
    decoder = hf.patch(transformers.BertForSequenceClassification(cross))
    assert [m._llmcore_patched["first_token_layer"] for m in (base, tokens, decoder)] == [0, 0, 0]

    model = hf.patch(copy.deepcopy(ref))
    torch.save(model, tmp_path / "model.pt")
    back = torch.load(tmp_path / "model.pt", weights_only=False)
    assert hf.patch(back)._llmcore_patched == model._llmcore_patched
    assert _last_layer(back).forward.__self__ is _last_layer(back)
    shapes = _output_shapes(back)
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, ref(**batch).logits, **FP32)
    assert shapes == [(3, 1, 48)]
