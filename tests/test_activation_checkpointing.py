"""Activation checkpointing (TrainConfig.activation_checkpointing, model.activation_checkpointing_enable(); the
older gradient_checkpointing names too): layers' activations are recomputed in the backward, not kept. Training is
bit for bit the same (dropout included), and far fewer bytes are kept for the backward."""
import json

import pytest
import torch
from test_train import packed, padded, tiny

from llmcore.bench.train_step import saved_bytes
from llmcore.cli import main
from llmcore.models import DecoderConfig, DecoderForCausalLM
from llmcore.train import TrainConfig, Trainer


def _decoder(family="llama", dropout=0.1, layers=3):
    torch.manual_seed(0)
    return DecoderForCausalLM(DecoderConfig(
        family=family, vocab_size=60, hidden_size=32, num_layers=layers, num_heads=4,
        num_kv_heads=4 if family == "gpt2" else 2, head_dim=8,  # (GPT-2 has no GQA)
        intermediate_size=48, max_position_embeddings=32, dropout=dropout,
        attention_dropout=dropout))


def _lm_batch(gen):
    ids = torch.randint(1, 60, (2, 9), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _saved_bytes(model, batch) -> int:
    """Bytes autograd keeps from one forward for the backward (what checkpointing trades for recompute); the
    backward then runs too, outside the count (the gradients are compared)."""
    loss = None

    def forward():
        nonlocal loss
        loss = model(**batch).loss

    total = saved_bytes(forward)
    loss.backward()
    return total


def _train(model, batches, tmp_path, name, **kw):
    config = TrainConfig(str(tmp_path / name), max_steps=4, warmup_steps=1, learning_rate=1e-3, logging_steps=1,
                         save_strategy="no", report_to="none", disable_tqdm=True, **kw)
    trainer = Trainer(model, config, batches)
    trainer.train()
    return trainer


@pytest.mark.parametrize("layout", [packed, padded])
@pytest.mark.parametrize("bf16", [False, True])
def test_training_is_bit_for_bit_the_same(tmp_path, layout, bf16):
    """The loop (an encoder, dropout on) with and without recomputation: the same losses and weights."""
    gen = torch.Generator().manual_seed(3)
    batches = [layout(gen, 4) for _ in range(4)]
    plain = _train(tiny(0, dropout=0.1), batches, tmp_path, "plain", bf16=bf16)
    recomputed = _train(tiny(0, dropout=0.1), batches, tmp_path, "recomputed", bf16=bf16,
                        activation_checkpointing=True)
    assert recomputed.model.is_activation_checkpointing and not plain.model.is_activation_checkpointing
    assert [r["loss"] for r in recomputed.log_history if "loss" in r] == \
        [r["loss"] for r in plain.log_history if "loss" in r]
    theirs = plain.model.state_dict()
    for name, t in recomputed.model.state_dict().items():
        assert torch.equal(t, theirs[name]), name
    start = tiny(0).state_dict()
    assert sum(not torch.equal(t, start[k]) for k, t in theirs.items()) > len(theirs) // 2  # it trained


def test_a_refused_trainer_leaves_the_model_as_it_was(tmp_path):
    """Found by a probe: Trainer(activation_checkpointing=True) turned recomputation on before refusing the model
    (a torch.compile wrapper, a module it cannot save, fsdp without a process group), leaving it on."""
    model = tiny(0)
    config = dict(save_strategy="no", report_to="none", disable_tqdm=True, activation_checkpointing=True)
    with pytest.raises(ValueError, match="no process group is initialized"):
        Trainer(model, TrainConfig(str(tmp_path / "a"), fsdp="full_shard", **config), [])
    config["save_strategy"] = "steps"
    with pytest.raises(TypeError, match="torch.compile"):
        Trainer(torch.compile(model), TrainConfig(str(tmp_path / "b"), **config), [])
    assert not model.is_activation_checkpointing
    assert Trainer(model, TrainConfig(str(tmp_path / "c"), **config), []).model.is_activation_checkpointing


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("bf16", [False, True])
def test_decoder_gradients_are_bit_for_bit_the_same(family, bf16):
    """Causal LMs (dropout on, tied and untied heads): two steps of gradients with and without recomputation."""
    gen = torch.Generator().manual_seed(5)
    batches = [_lm_batch(gen) for _ in range(2)]
    grads = []
    for recompute in (False, True):
        model = _decoder(family).train()
        if recompute:
            model.activation_checkpointing_enable()
        torch.manual_seed(9)  # the dropout masks' seeds
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(**batch).loss.backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for k, g in grads[0].items():
        assert torch.equal(grads[1][k], g), k


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}])
def test_fewer_bytes_are_kept_for_the_backward(kwargs):
    gen = torch.Generator().manual_seed(4)
    batch = _lm_batch(gen)
    model = _decoder(dropout=0.0, layers=4).train()
    kept = _saved_bytes(model, batch)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable(kwargs)
    recomputed = _saved_bytes(model, batch)
    # four layers' activations against their inputs alone (the reentrant form saves nothing through autograd)
    assert recomputed < kept / 3, (recomputed, kept)
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, grads[k]), k
    # every second layer (0 and 2) recomputed: between the two
    model.zero_grad()
    model.activation_checkpointing_enable(kwargs, every_n_layers=2)
    half = _saved_bytes(model, batch)
    assert recomputed < half < kept, (recomputed, half, kept)
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, grads[k]), k
    # evaluation and no_grad forwards run the layers plainly
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch["input_ids"]).logits, _decoder(dropout=0.0, layers=4).eval()(
            batch["input_ids"]).logits, rtol=0, atol=0)
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing and not model.is_gradient_checkpointing


def test_older_names_and_offload_on_the_cpu():
    """gradient_checkpointing_enable (transformers < 5) is the same switch; offload has nothing to move on a CPU."""
    gen = torch.Generator().manual_seed(6)
    batch = _lm_batch(gen)
    model = _decoder(dropout=0.0).train()
    kept = _saved_bytes(model, batch)
    model.gradient_checkpointing_enable({"use_reentrant": False}, offload=True)
    assert model.is_gradient_checkpointing and model.is_activation_checkpointing
    assert _saved_bytes(model, batch) < kept / 3
    model.gradient_checkpointing_disable()
    assert not model.is_activation_checkpointing


def test_settings(tmp_path, capsys):
    config = TrainConfig("o")
    assert config.activation_checkpointing is False and config.activation_checkpointing_kwargs is None
    config = TrainConfig("o", activation_checkpointing=True, activation_checkpointing_kwargs='{"every_n_layers": 2}')
    assert config.activation_checkpointing_kwargs == {"use_reentrant": False, "every_n_layers": 2}
    # the older names count when the new ones are unset, and then mirror them
    config = TrainConfig("o", gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert config.activation_checkpointing and config.activation_checkpointing_kwargs == {"use_reentrant": True}
    assert config.gradient_checkpointing and config.gradient_checkpointing_kwargs == {"use_reentrant": True}
    config = TrainConfig("o", activation_checkpointing=False, gradient_checkpointing=True)
    assert not config.activation_checkpointing and not config.gradient_checkpointing
    with pytest.raises(ValueError, match=r"\['context_fn'\] not supported"):
        TrainConfig("o", activation_checkpointing=True, activation_checkpointing_kwargs={"context_fn": None})
    with pytest.raises(ValueError, match="every_n_layers must be an int >= 1"):
        TrainConfig("o", activation_checkpointing=True, activation_checkpointing_kwargs={"every_n_layers": 0})
    with pytest.raises(ValueError, match="offload must be a bool"):
        TrainConfig("o", activation_checkpointing=True, activation_checkpointing_kwargs={"offload": "yes"})
    with pytest.raises(ValueError, match="not valid JSON"):
        TrainConfig("o", activation_checkpointing=True, activation_checkpointing_kwargs="{use_reentrant: false}")
    with pytest.raises(TypeError, match="activation_checkpointing must be a bool"):
        TrainConfig("o", activation_checkpointing="yes")
    # a model takes every_n_layers and offload as arguments, not inside the kwargs for torch
    with pytest.raises(ValueError, match=r"\['every_n_layers'\] not supported"):
        tiny().activation_checkpointing_enable({"every_n_layers": 2})
    with pytest.raises(ValueError, match="has no activation_checkpointing_enable"):
        Trainer(torch.nn.Linear(2, 2), TrainConfig(str(tmp_path), activation_checkpointing=True, save_strategy="no"),
                [])
    # the loop passes every_n_layers and offload to the model as arguments
    trainer = Trainer(tiny(), TrainConfig(str(tmp_path), activation_checkpointing=True,
                                          activation_checkpointing_kwargs={"every_n_layers": 2, "offload": True,
                                                                           "use_reentrant": True}), [])
    assert trainer.model._checkpointing == ({"use_reentrant": True}, 2, True)
    # a transformers model gets its own switch, with the same settings (every_n_layers: transformers >= 5)
    import transformers

    if hasattr(transformers.PreTrainedModel, "activation_checkpointing_enable"):
        bert = transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
        Trainer(bert, TrainConfig(str(tmp_path), activation_checkpointing=True,
                                  activation_checkpointing_kwargs={"every_n_layers": 2}), [])
        assert [layer.gradient_checkpointing for layer in bert.bert.encoder.layer] == [True, False]
    # the command line: a bad value stops before any data is prepared
    out = tmp_path / "run"
    assert main(["finetune", "--data", str(tmp_path / "nowhere"), "--output-dir", str(out),
                 "--gradient-checkpointing", "--gradient-checkpointing-kwargs", json.dumps({"reentrant": False})]) == 2
    assert "['reentrant'] not supported" in capsys.readouterr().err and not out.exists()


def test_saved_bytes_counts_each_storage_once():
    """A tensor saved by several ops, or views of one buffer, is one allocation: ``x * x`` keeps x (saved twice)
    and ``a @ b`` on two halves of one buffer keeps that buffer. Summing every saved tensor double-counted them."""
    x = torch.randn(1000, requires_grad=True)
    assert saved_bytes(lambda: (x * x).sum()) == x.nbytes
    buf = torch.randn(2, 64, 64, requires_grad=True)
    assert saved_bytes(lambda: (buf[0] @ buf[1]).sum()) == buf.nbytes
    y = torch.randn(10, requires_grad=True)
    assert saved_bytes(lambda: (x.sin().sum() + y.cos().sum())) == x.nbytes + y.nbytes


def test_saved_bytes_leaves_the_models_parameters_out():
    """A linear layer saves its weight (as a transposed view) beside its input; the weight stays resident whether
    the layer is recomputed or not, so counting it inflated checkpointing's drop by the weights' size (an audit:
    four 1024 x 1024 layers on 8 rows counted 16.1 MiB, of which 16 MiB were parameters)."""
    model = torch.nn.Sequential(*(torch.nn.Linear(256, 256) for _ in range(4)))
    x = torch.randn(8, 256)

    def forward():
        return model(x).sum()

    # the weights of layers 2-4 (the first layer's input needs no gradient: its weight is not saved; no bias is)
    weights = sum(layer.weight.nbytes for layer in model[1:])
    with_params, without = saved_bytes(forward), saved_bytes(forward, model)
    assert with_params - without == weights
    assert without == 4 * x.nbytes  # (each layer's input: x and three activations of its size)
