import contextlib
import json
import os
import math
import random
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmcore.models import CheckpointError, EncoderConfig, EncoderForSequenceClassification
from llmcore.train import (
    TrainConfig,
    Trainer,
    accumulate_gradients,
    linear_schedule,
    list_checkpoints,
    make_optimizer,
    make_schedule,
    param_groups,
)


def tiny(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    cfg = EncoderConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                        max_position_embeddings=64, hidden_dropout=dropout, attention_dropout=dropout)
    return EncoderForSequenceClassification(cfg)


def padded(gen, n, length=7):
    return {"input_ids": torch.randint(1, 100, (n, length), generator=gen),
            "attention_mask": torch.ones(n, length, dtype=torch.long),
            "labels": torch.randint(0, 2, (n,), generator=gen)}


def packed(gen, n):
    lengths = torch.randint(2, 9, (n,), generator=gen)
    cu = torch.zeros(n + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return {"input_ids": torch.randint(1, 100, (int(cu[-1]),), generator=gen), "cu_seqlens": cu,
            "labels": torch.randint(0, 2, (n,), generator=gen)}


def factory(n_batches, seed=42, sizes=(3, 5, 2, 4, 6)):
    """Deterministic per (seed, epoch), independent of the global RNG; mixes padded and packed batches."""
    def batches(epoch):
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        return [(padded if i % 2 else packed)(gen, sizes[i % len(sizes)]) for i in range(n_batches)]
    return batches


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), warmup_steps=2, learning_rate=1e-3, logging_steps=1,
                save_strategy="no", num_train_epochs=2)
    base.update(kw)
    return TrainConfig(**base)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="eval_strategy"):
        TrainConfig(str(tmp_path), eval_strategy="sometimes")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        TrainConfig(str(tmp_path), gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="logging_steps"):
        TrainConfig(str(tmp_path), logging_steps=1.5)
    with pytest.raises(TypeError, match="save_steps"):
        TrainConfig(str(tmp_path), save_steps=True)
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(str(tmp_path), learning_rate=-1.0)
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(str(tmp_path), max_steps=0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainConfig(str(tmp_path), warmup_ratio=1.5)
    c = TrainConfig(str(tmp_path), warmup_steps=0, warmup_ratio=0.1, logging_steps=7)
    assert c.eval_steps == 7 and c.num_warmup_steps(100) == 10
    assert c.logging_dir == os.path.join(str(tmp_path), "logs")
    assert TrainConfig(str(tmp_path), warmup_steps=5, warmup_ratio=0.5).num_warmup_steps(100) == 5
    # warmup_steps left unset: 500, or 0 beside a warmup_ratio, which then counts (the 500 won silently)
    assert TrainConfig(str(tmp_path)).num_warmup_steps(1000) == 500
    assert TrainConfig(str(tmp_path), warmup_ratio=0.1).num_warmup_steps(1000) == 100
    # and a warmup_ratio of 0 given asks for none (found by a probe: it gave the 500)
    zero = TrainConfig(str(tmp_path), warmup_ratio=0.0)
    assert zero.num_warmup_steps(1000) == 0 and zero.warmup_ratio == 0.0
    assert TrainConfig(str(tmp_path)).warmup_ratio == 0.0
    # transformers 5 reads a float warmup_steps in (0, 1) as a fraction of the run (it was refused)
    from transformers import TrainingArguments
    for steps in (0.1, 0.05, 0.0, 30.0, 1.5, 7.9):  # (at and past 1, transformers takes int(): 1.5 is 1 step)
        theirs = TrainingArguments(str(tmp_path), warmup_steps=steps).get_warmup_steps(1001)
        assert TrainConfig(str(tmp_path), warmup_steps=steps).num_warmup_steps(1001) == theirs, steps
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fraction of the run"):
            TrainConfig(str(tmp_path), warmup_steps=bad)
    with pytest.raises(ValueError, match="give one"):
        TrainConfig(str(tmp_path), warmup_steps=0.1, warmup_ratio=0.2)
    # save_total_limit 0 (or less) deletes nothing, as transformers' rotate_checkpoints (it was refused)
    assert TrainConfig(str(tmp_path), save_total_limit=0).save_total_limit is None
    assert TrainConfig(str(tmp_path), save_total_limit=2).save_total_limit == 2
    with pytest.raises(TypeError, match="save_total_limit"):
        TrainConfig(str(tmp_path), save_total_limit=1.0)
    from llmcore.cli import build_parser
    help_ = " ".join(build_parser()._subparsers._group_actions[0].choices["finetune"].format_help().split())
    for flag, default in (("logging-dir", "<output-dir>/logs"), ("pad-to-multiple-of", "64 tokens packed"),
                          ("metric-for-best-model", "loss with --load-best-model-at-end")):
        assert f"--{flag} {flag.upper().replace('-', '_')} default: {default}" in help_, flag
    args = ["finetune", "--data", "d", "--output-dir", "o", "--warmup-steps"]
    assert [build_parser().parse_args(args + [v]).warmup_steps for v in ("0.05", "7")] == [0.05, 7]
    with pytest.raises(ValueError, match="eval_batches"):
        Trainer(tiny(), TrainConfig(str(tmp_path), eval_strategy="epoch"), factory(2))


def test_fractional_step_settings_as_transformers_trainer(tmp_path):
    """logging_steps / eval_steps / save_steps as floats in (0, 1) are fractions of the run, rounded up, as
    transformers takes them (llmcore refused them): the steps logged, evaluated and checkpointed equal those of
    transformers' Trainer on the same settings; 4.0 is 4 steps; load_best_model_at_end needs the resolved save
    steps a multiple of the eval steps."""
    import transformers

    from llmcore.cli import build_parser

    kw = dict(max_steps=10, logging_steps=0.15, eval_strategy="steps", eval_steps=0.25, save_strategy="steps",
              save_steps=0.5)
    torch.manual_seed(0)
    ref = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    rows = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": i % 2} for i in range(8)]
    args = transformers.TrainingArguments(str(tmp_path / "hf"), per_device_train_batch_size=2, report_to="none",
                                          use_cpu=True, disable_tqdm=True, **kw)
    theirs = transformers.Trainer(model=ref, args=args, train_dataset=rows, eval_dataset=rows[:2])
    theirs.train()
    ours = Trainer(tiny(), config(tmp_path / "ours", **kw, report_to="none"), factory(4),
                   eval_batches=factory(1)(0))
    ours.train()

    def steps(history, key):
        return [r["step"] for r in history if key in r]

    for key in ("loss", "eval_loss"):
        assert steps(ours.log_history, key) == steps(theirs.state.log_history, key), key
    assert steps(ours.log_history, "loss") == [2, 4, 6, 8, 10]  # ceil(0.15 * 10)
    # transformers' speed metrics: in every evaluation record, and the run's last record (its summary; llmcore
    # computes no total_flos and adds train_tokens_per_second)
    timing = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
    for history in (ours.log_history, theirs.state.log_history):
        assert all(k in r for r in history if "eval_loss" in r for k in timing)
    summary = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "epoch", "step")
    assert set(theirs.state.log_history[-1]) == {*summary, "total_flos"}
    assert set(ours.log_history[-1]) == {*summary, "train_tokens_per_second"}
    assert ours.log_history[-1]["epoch"] == theirs.state.log_history[-1]["epoch"]
    assert steps(ours.log_history, "eval_loss") == [3, 6, 9, 10]  # ceil(2.5), and the last step
    saved = [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "ours" / "out"))]
    assert saved == ["checkpoint-5", "checkpoint-10"]
    assert set(saved) == {f for f in os.listdir(tmp_path / "hf") if f.startswith("checkpoint-")}
    assert TrainConfig(str(tmp_path), logging_steps=4.0).logging_steps == 4
    with pytest.raises(ValueError, match="both be counts or both fractions"):
        TrainConfig(str(tmp_path), load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps",
                    eval_steps=0.1, save_steps=10)
    best = config(tmp_path / "best", max_steps=10, eval_strategy="steps", save_strategy="steps", eval_steps=0.3,
                  save_steps=0.5, load_best_model_at_end=True)  # every 3 and every 5 steps
    with pytest.raises(ValueError, match="every 5 and 3 steps"):
        Trainer(tiny(), best, factory(4), eval_batches=factory(1)(0)).train()
    flags = build_parser().parse_args(["finetune", "--data", "d", "--output-dir", "o", "--eval-steps", "0.25",
                                       "--save-steps", "100", "--logging-steps", "0.5"])
    assert (flags.eval_steps, flags.save_steps, flags.logging_steps) == (0.25, 100, 0.5)


def test_param_groups_exclude_bias_and_norm():
    model = tiny()
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 for p in decay["params"])
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "embed.norm.weight" in nd and "layers.0.attn.q.bias" in nd and "layers.1.mlp_norm.weight" in nd
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    # a 2-D table named bias (MPNet's relative_attention_bias) is exempt, as transformers' own rule has it
    from transformers import MPNetConfig, MPNetForSequenceClassification, Trainer as HfTrainer

    mpnet = MPNetForSequenceClassification(MPNetConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=32))
    names = {id(p): n for n, p in mpnet.named_parameters()}
    ours = {names[id(p)] for p in param_groups(mpnet, 0.01)[0]["params"]}
    assert "mpnet.encoder.relative_attention_bias.weight" not in ours
    assert ours == set(HfTrainer.get_decay_parameter_names(None, mpnet))
    # transformers' name patterns, not any "norm" substring: these matrices are decayed there and here

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalizer, self.enormous_proj, self.attn_norm = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    named = Named()
    names = {id(p): n for n, p in named.named_parameters()}
    ours = {names[id(p)] for p in param_groups(named, 0.01)[0]["params"]}
    assert ours == set(HfTrainer.get_decay_parameter_names(None, named)) == {"normalizer.weight",
                                                                             "enormous_proj.weight"}


def test_linear_schedule_matches_transformers_formula():
    opt = make_optimizer(tiny(), lr=1.0, weight_decay=0.0)
    sched = linear_schedule(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(7):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0])


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_schedules_match_transformers(kind):
    """Each lr_scheduler_type against transformers.get_scheduler, steps past the end included."""
    import transformers

    ours, theirs = (make_optimizer(tiny(), lr=0.1, weight_decay=0.0) for _ in range(2))
    schedules = [make_schedule(ours, kind, 3, 10),
                 transformers.get_scheduler(kind, theirs, num_warmup_steps=3, num_training_steps=10)]
    for _ in range(13):
        a, b = (s.get_last_lr()[0] for s in schedules)
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15)
        for opt, sched in zip((ours, theirs), schedules):
            opt.step()
            sched.step()
    with pytest.raises(ValueError, match="lr_scheduler_type must be one of"):
        make_schedule(ours, "polynomial", 3, 10)


def test_optimizer_and_schedule_settings_reach_the_loop(tmp_path):
    import transformers

    gen = torch.Generator().manual_seed(8)
    batches = [padded(gen, 3) for _ in range(6)]
    config = TrainConfig(str(tmp_path), max_steps=6, warmup_steps=2, learning_rate=1e-3, lr_scheduler_type="cosine",
                         adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, logging_steps=1, save_strategy="no",
                         report_to="none", disable_tqdm=True)
    trainer = Trainer(tiny(), config, batches)
    trainer.train()
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in trainer.optimizer.param_groups)
    reference = transformers.get_scheduler("cosine", make_optimizer(tiny(), lr=1e-3, weight_decay=0.0),
                                           num_warmup_steps=2, num_training_steps=6)
    expected = []
    for _ in range(6):
        expected.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    rates = [r["learning_rate"] for r in trainer.log_history if "learning_rate" in r]
    assert rates == pytest.approx(expected, rel=1e-12)
    for bad, match in [({"adam_beta1": 1.0}, "adam_beta1 must be < 1"), ({"adam_beta2": -0.1}, "adam_beta2 must be"),
                       ({"adam_epsilon": float("nan")}, "adam_epsilon must be"),
                       ({"lr_scheduler_type": "cosine_with_restarts"}, "lr_scheduler_type must be one of")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig("o", **bad)


def test_a_warmup_as_long_as_the_run_is_said(tmp_path, capsys):
    """warmup_steps (default 500) not below the run's steps: the learning rate never reaches learning_rate; said
    on stderr with the peak it does reach (checked against the logged rates). Shorter warmups and the constant
    schedule (no warmup) say nothing."""
    gen = torch.Generator().manual_seed(8)
    batches = [padded(gen, 3) for _ in range(4)]
    settings = {"max_steps": 4, "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no",
                "report_to": "none", "disable_tqdm": True}
    trainer = Trainer(tiny(), TrainConfig(str(tmp_path / "a"), warmup_steps=6, **settings), batches)
    trainer.train()
    err = capsys.readouterr().err
    assert "the warmup (6 steps) is not shorter than the run (4 steps): the learning rate peaks at 50% of " \
           "learning_rate=0.001, at the last step" in err
    rates = [r["learning_rate"] for r in trainer.log_history if "learning_rate" in r]
    assert max(rates) == pytest.approx(0.5e-3, rel=1e-12)
    Trainer(tiny(), TrainConfig(str(tmp_path / "c"), warmup_steps=500, **{**settings, "max_steps": 3}), batches).train()
    assert "peaks at 0.4% of learning_rate" in capsys.readouterr().err  # (2 / 500: it said 0%)
    for i, kw in enumerate(({"warmup_steps": 3}, {"warmup_steps": 6, "lr_scheduler_type": "constant"})):
        Trainer(tiny(), TrainConfig(str(tmp_path / f"b{i}"), **kw, **settings), batches).train()
        assert "warmup" not in capsys.readouterr().err


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_uneven_accumulation_equals_one_big_batch():
    gen = torch.Generator().manual_seed(0)
    big = padded(gen, 8)
    parts = [slice(0, 1), slice(1, 4), slice(4, 8)]  # 1 + 3 + 4 examples
    micro = [{k: v[s] for k, v in big.items()} for s in parts]
    model = tiny(dropout=0.0)
    model.train()
    loss_big, n_big = accumulate_gradients(model, [big])
    g_big = _grads(model)
    model.zero_grad(set_to_none=True)
    loss_acc, n_acc = accumulate_gradients(model, micro)
    g_acc = _grads(model)
    assert n_big == n_acc == 8
    torch.testing.assert_close(loss_acc, loss_big, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_acc, g_big, rtol=1e-4, atol=1e-6)
    # The bug being avoided: a mean of per-micro-batch means gives a different gradient.
    model.zero_grad(set_to_none=True)
    for mb in micro:
        out = model(**{k: v for k, v in mb.items() if k != "labels"})
        (F.cross_entropy(out.logits, mb["labels"]) / len(micro)).backward()
    assert not torch.allclose(_grads(model), g_big, rtol=1e-3, atol=1e-5)


def test_ignored_labels_are_not_counted():
    gen = torch.Generator().manual_seed(1)
    b = padded(gen, 4)
    b["labels"][1] = -100
    model = tiny(dropout=0.0)
    loss, n = accumulate_gradients(model, [b])
    logits = model(b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert n == 3
    torch.testing.assert_close(loss, F.cross_entropy(logits, b["labels"], ignore_index=-100), rtol=1e-5,
                               atol=1e-6)


def _losses(history):
    return [r["loss"] for r in history if "loss" in r]


@pytest.mark.parametrize("accum,n_batches,save_at,bf16", [(1, 4, 3, False), (2, 5, 3, False), (2, 5, 4, False),
                                                           (1, 4, 3, True), (2, 5, 3, True)])
def test_resume_is_exact(tmp_path, accum, n_batches, save_at, bf16):
    """Resuming from a checkpoint continues bit for bit; under bf16 the linear weights' bf16
    copies (llmcore.train.bf16_weights) are rebuilt from the checkpoint's weights."""
    batches = factory(n_batches)
    straight = Trainer(tiny(0), config(tmp_path / "a", max_steps=6, gradient_accumulation_steps=accum,
                                       save_strategy="steps", save_steps=save_at, bf16=bf16), batches)
    straight.train()
    ref = _losses(straight.log_history)
    assert len(ref) == 6
    ckpt = os.path.join(straight.config.output_dir, f"checkpoint-{save_at}")
    assert os.path.isfile(os.path.join(ckpt, "model.safetensors"))
    # A fresh process-like start: other init, disturbed global RNG; everything must come from the checkpoint.
    torch.manual_seed(1234)
    random.seed(99)
    resumed = Trainer(tiny(7), config(tmp_path / "a", max_steps=6, gradient_accumulation_steps=accum,
                                      save_strategy="no", resume_from_checkpoint=ckpt, bf16=bf16), batches)
    out = resumed.train()
    assert out["global_step"] == 6
    assert _losses(resumed.log_history) == ref  # restored history + the same losses afterwards, bit for bit
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_train_logs_evaluates_saves_and_rotates(tmp_path, capsys):
    gen = torch.Generator().manual_seed(5)
    eval_set = [padded(gen, 3), packed(gen, 4)]
    cfg = config(tmp_path, num_train_epochs=3, eval_strategy="epoch", save_strategy="epoch", save_total_limit=2,
                 logging_steps=2)
    trainer = Trainer(tiny(), cfg, factory(4), eval_batches=eval_set)
    out = trainer.train()
    assert out["global_step"] == 12 and out["epoch"] == 3
    evals = [r for r in trainer.log_history if "eval_loss" in r]
    assert len(evals) == 3 and all(r["eval_examples"] == 7 and 0 <= r["eval_accuracy"] <= 1 for r in evals)
    logs = [r for r in trainer.log_history if "loss" in r]
    assert [r["step"] for r in logs] == [2, 4, 6, 8, 10, 12]
    assert logs[-1]["learning_rate"] > 0 and logs[0]["samples_per_second"] > 0
    # transformers' key names (TensorBoard tags train/learning_rate, train/grad_norm); grad_norm when clipping
    assert set(logs[0]) == {"step", "epoch", "loss", "learning_rate", "grad_norm", "samples_per_second"}
    assert [os.path.basename(p) for p in list_checkpoints(cfg.output_dir)] == ["checkpoint-8", "checkpoint-12"]
    with open(os.path.join(cfg.logging_dir, "train_log.jsonl")) as f:
        assert [json.loads(line) for line in f] == trainer.log_history
    assert '"step": 12' in capsys.readouterr().out
    with open(os.path.join(cfg.output_dir, "checkpoint-12", "trainer_state.json")) as f:
        state = json.load(f)
    assert state["epoch"] == 3 and state["batches_in_epoch"] == 0


def test_loss_decreases_and_resume_true_picks_latest(tmp_path):
    gen = torch.Generator().manual_seed(3)
    fixed = [padded(gen, 8) for _ in range(2)]
    for b in fixed:  # a learnable rule: label = first token is even
        b["labels"] = (b["input_ids"][:, 0] % 2 == 0).long()
    cfg = config(tmp_path, num_train_epochs=15, warmup_steps=0, learning_rate=3e-3, save_strategy="steps",
                 save_steps=10)
    trainer = Trainer(tiny(dropout=0.0), cfg, fixed, eval_batches=lambda: fixed)
    trainer.train()
    losses = _losses(trainer.log_history)
    assert losses[-1] < losses[0] * 0.5
    assert trainer.evaluate()["eval_accuracy"] >= 0.9
    again = Trainer(tiny(dropout=0.0), config(tmp_path, num_train_epochs=15, warmup_steps=0, learning_rate=3e-3,
                                              save_strategy="no", resume_from_checkpoint=True), fixed)
    assert again.train()["global_step"] == 30  # resumed at the end: nothing left to do


def test_bf16_autocast_step(tmp_path):
    trainer = Trainer(tiny(), config(tmp_path, max_steps=2, bf16=True), factory(2))
    out = trainer.train()
    assert out["global_step"] == 2 and torch.isfinite(torch.tensor(out["train_loss"]))


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shards = _ddp_shards()
        cfg = TrainConfig(str(out_dir), max_steps=3, warmup_steps=1, learning_rate=1e-3, logging_steps=1,
                          save_strategy="steps", save_steps=3, gradient_accumulation_steps=2)
        trainer = Trainer(tiny(0, dropout=0.0), cfg, [b[rank] for b in shards])
        trainer.train()
        if rank == 0:
            torch.save(trainer.model.state_dict(), os.path.join(str(out_dir), "ddp_final.pt"))
            torch.save([r["grad_norm"] for r in trainer.log_history if "grad_norm" in r],
                       os.path.join(str(out_dir), "ddp_grad_norms.pt"))
    finally:
        dist.destroy_process_group()


def _ddp_shards():
    """Per micro-batch, one uneven shard per rank (2 + 5 examples, then 4 + 1, ...)."""
    gen = torch.Generator().manual_seed(11)
    return [(padded(gen, a), padded(gen, b)) for a, b in [(2, 5), (4, 1), (3, 3), (1, 6), (5, 2), (2, 2)]]


def test_ddp_two_ranks_match_one_process(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), tmp_path / "ddp"), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp" / "ddp_final.pt")
    # One process seeing both shards of each micro-batch at once must take the same steps.
    merged = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in _ddp_shards()]
    single = Trainer(tiny(0, dropout=0.0), TrainConfig(str(tmp_path / "one"), max_steps=3, warmup_steps=1,
                                                       learning_rate=1e-3, save_strategy="no", logging_steps=1,
                                                       gradient_accumulation_steps=2), merged)
    single.train()
    for name, t in single.model.state_dict().items():
        torch.testing.assert_close(ddp[name], t, rtol=1e-4, atol=1e-5, msg=name)
    # the gradients' scale itself: the norm before the clip
    norms = [r["grad_norm"] for r in single.log_history if "grad_norm" in r]
    assert len(norms) == 3
    torch.testing.assert_close(torch.tensor(torch.load(tmp_path / "ddp" / "ddp_grad_norms.pt")), torch.tensor(norms),
                               rtol=1e-4, atol=0)
    assert os.path.isfile(tmp_path / "ddp" / "checkpoint-3" / "rng_state_1.pt")


def test_evaluate_macro_f1_matches_float64_reference(tmp_path):
    """Streaming per-class counts give scikit-learn's macro-F1: per-class 2TP/(pred+true) in float64,
    averaged over the classes present among labels or predictions (a 4-way head, one class unused)."""
    import numpy as np

    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=100, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                        max_position_embeddings=64, num_labels=4)
    model = EncoderForSequenceClassification(cfg).eval()
    gen = torch.Generator().manual_seed(2)
    batches = []
    for n in (5, 9, 3):
        b = padded(gen, n)
        b["labels"] = torch.randint(0, 3, (n,), generator=gen)  # class 3 never a label
        batches.append(b)
    batches[1]["labels"][0] = -100  # ignored
    trainer = Trainer(model, config(tmp_path, report_to="none"), batches, eval_batches=batches)
    out = trainer.evaluate()
    with torch.no_grad():
        pred = np.concatenate([model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1).numpy()
                               for b in batches])
    gold = np.concatenate([b["labels"].numpy() for b in batches])
    pred, gold = pred[gold != -100], gold[gold != -100]
    f1s = []
    for c in sorted(set(gold) | set(pred)):
        tp = float(np.sum((pred == c) & (gold == c)))
        f1s.append(2 * tp / (np.sum(pred == c) + np.sum(gold == c)))
    assert out["eval_examples"] == 16
    assert out["eval_accuracy"] == pytest.approx(float(np.mean(pred == gold)), abs=1e-12)
    assert out["eval_f1"] == pytest.approx(float(np.mean(f1s)), abs=1e-12)


def _votes_rows():
    """Windows of 6 texts (3 classes): text ids, logits, labels (a text's windows share its label; -100 ignored)."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 5, 1])
    labels = torch.tensor([2, 2, 0, 1, 1, 1, 0, 2, 2, 1, 1, 0])
    labels[6] = -100  # text 3's only window is ignored: text 3 is not scored
    return ids, torch.randn(len(ids), 3, generator=gen), labels


def test_text_votes_match_float64_reference():
    """By text: the mean of the windows' softmax probabilities (float64), argmax; accuracy and macro-F1 over the
    texts that have a labelled window."""
    import numpy as np

    from llmcore.train.loop import TextVotes, macro_f1

    ids, logits, labels = _votes_rows()
    votes = TextVotes()
    for part in (slice(0, 5), slice(5, 12)):
        votes.update(ids[part], logits[part], labels[part])
    out = votes.compute("cpu")
    probs = torch.softmax(logits.double(), -1).numpy()
    pred, gold = {}, {}
    for i, t, y in zip(range(len(ids)), ids.tolist(), labels.tolist()):
        if y != -100:
            pred.setdefault(t, []).append(probs[i])
            gold[t] = y
    texts = sorted(pred)
    p = np.array([np.mean(pred[t], 0).argmax() for t in texts])
    g = np.array([gold[t] for t in texts])
    assert out["eval_texts"] == len(texts) == 5
    assert out["eval_text_accuracy"] == pytest.approx(float(np.mean(p == g)), abs=1e-12)
    tp = torch.bincount(torch.tensor(g[p == g]), minlength=3)
    assert out["eval_text_f1"] == macro_f1(tp, torch.bincount(torch.tensor(p), minlength=3),
                                           torch.bincount(torch.tensor(g), minlength=3))


def _votes_worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    from llmcore.train.loop import TextVotes

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ids, logits, labels = _votes_rows()
        votes = TextVotes()
        if rank < 2:  # the windows of texts 0, 1, 2, 4 and 5 on both ranks; rank 2 sees none
            mine = torch.arange(rank, len(ids), 2)
            votes.update(ids[mine], logits[mine], labels[mine])
        out = votes.compute("cpu", world)
        if rank == 2:
            with open(out_file, "w") as f:
                json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_text_votes_across_ranks(tmp_path):
    """Under torch.distributed a text's windows may be on several ranks (and a rank may have none): the scores are
    those of one process with every window."""
    import torch.multiprocessing as mp

    from llmcore.train.loop import TextVotes

    mp.spawn(_votes_worker, args=(3, str(tmp_path / "init"), str(tmp_path / "out.json")), nprocs=3, join=True)
    with open(tmp_path / "out.json") as f:
        spread = json.load(f)
    votes = TextVotes()
    votes.update(*_votes_rows())
    assert spread == votes.compute("cpu")


def test_bf16_evaluate_in_one_autocast_region_matches_per_batch(tmp_path):
    """bf16 evaluation runs every batch in one autocast region (weights cast once): the loss and
    counts equal those of each batch run in its own region, and a custom metric sees float32
    logits outside autocast."""
    model = tiny(3, dropout=0.0).eval()
    gen = torch.Generator().manual_seed(8)
    batches = [padded(gen, 4), packed(gen, 5), padded(gen, 3, length=9)]

    class Seen:
        def __init__(self):
            self.autocast, self.dtypes = [], []

        def update(self, logits, labels):
            self.autocast.append(torch.is_autocast_enabled("cpu"))
            self.dtypes.append(logits.dtype)

        def compute(self):
            return {}

    seen = []
    trainer = Trainer(model, config(tmp_path, bf16=True, report_to="none"), batches, eval_batches=batches,
                      compute_metrics=lambda: seen.append(Seen()) or seen[-1])
    out = trainer.evaluate()
    loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for b in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
            loss += float(F.cross_entropy(logits.float(), b["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == b["labels"]).sum())
            n += b["labels"].numel()
    assert out["eval_examples"] == n
    assert out["eval_loss"] == pytest.approx(loss / n, rel=1e-6)
    assert out["eval_accuracy"] == pytest.approx(correct / n, abs=1e-12)
    assert seen[0].autocast == [False] * 3 and seen[0].dtypes == [torch.float32] * 3
    assert not torch.is_autocast_enabled("cpu")


def test_custom_metrics_see_only_labelled_rows(tmp_path):
    """Rows labelled -100 (filler sequences, ignored examples) reach neither the loss nor a
    compute_metrics object."""
    model = tiny(1, dropout=0.0).eval()
    gen = torch.Generator().manual_seed(9)
    batch = packed(gen, 6)
    batch["labels"][[1, 5]] = -100
    rows = []

    class Rows:
        def update(self, logits, labels):
            rows.append((logits.shape[0], labels.tolist()))

        def compute(self):
            return {"rows": sum(n for n, _ in rows)}

    out = Trainer(model, config(tmp_path, report_to="none"), [batch], eval_batches=[batch],
                  compute_metrics=Rows).evaluate()
    assert out["eval_examples"] == 4 and out["eval_rows"] == 4
    assert rows[0][1] == [batch["labels"][i].item() for i in (0, 2, 3, 4)]


def test_checkpoints_are_published_whole(tmp_path):
    """A checkpoint is written under a hidden .partial name and renamed into place: an interrupted
    write is never listed, and saving the same step again replaces the folder."""
    from llmcore.train.checkpoint import partial_path, publish_checkpoint

    out = tmp_path / "o"
    half = partial_path(str(out / "checkpoint-7"))
    os.makedirs(half)
    (out / "checkpoint-3").mkdir()
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-3"]
    with open(os.path.join(half, "a.txt"), "w") as f:
        f.write("new")
    (out / "checkpoint-3" / "a.txt").write_text("old")
    publish_checkpoint(half, str(out / "checkpoint-3"))
    assert (out / "checkpoint-3" / "a.txt").read_text() == "new"
    assert sorted(os.listdir(out)) == ["checkpoint-3"]
    trainer = Trainer(tiny(), config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1,
                                     report_to="none"), factory(3))
    trainer.train()
    assert sorted(os.listdir(trainer.config.output_dir)) == ["checkpoint-1", "checkpoint-2", "logs"]


def test_grad_norm_logged_without_clipping(tmp_path):
    """max_grad_norm=0 turns clipping off and still measures and logs the norm, as transformers does (a clip to
    infinity); llmcore logged null. The run is the one a limit never reached gives, norms and weights bitwise."""
    runs = []
    for name, limit in (("off", 0.0), ("huge", 1e30)):
        trainer = Trainer(tiny(dropout=0.0), config(tmp_path / name, max_steps=3, logging_steps=1,
                                                   max_grad_norm=limit), factory(4))
        trainer.train()
        runs.append(trainer)
    norms = [[r["grad_norm"] for r in t.log_history if "loss" in r] for t in runs]
    assert len(norms[0]) == 3 and all(n > 0 for n in norms[0]) and norms[0] == norms[1]
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(a, b)


def test_grad_norm_against_float64():
    """grad_norm against the float64 norm, on tensors the size of MiniLM's gradients (the
    11.7M-element embedding included): float32 and bf16 ones (the native sum of squares, exact
    to the float32 result's rounding and the same for any thread count), a non-contiguous and
    an fp16 one (per-tensor dots), none, inf and NaN."""
    from llmcore.train.optim import grad_norm

    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(30522, 384, generator=gen) * 1e-3, torch.randn(1536, 384, generator=gen),
             torch.randn(384, generator=gen), torch.randn(7, 3, generator=gen).t()]  # a non-contiguous one
    exact = torch.stack([g.double().pow(2).sum() for g in grads]).sum().sqrt()
    got = grad_norm(grads)
    assert got.dtype == torch.float32 and got.shape == ()
    doubles = [g.double() for g in grads[1:]]  # float64 gradients keep a float64 norm (it was rounded to float32)
    got64 = grad_norm(doubles)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, torch.stack([g.pow(2).sum() for g in doubles]).sum().sqrt(), rtol=1e-13, atol=0)
    torch.testing.assert_close(got.double(), exact, rtol=2e-6, atol=0)  # the non-contiguous one: a float32 dot
    contiguous = grads[:3]
    exact = torch.stack([g.double().pow(2).sum() for g in contiguous]).sum().sqrt()
    assert float(grad_norm(contiguous)) == float(exact.float())  # one rounding, of the float64 norm
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grad_norm(contiguous)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, grad_norm(contiguous))
    half = [g.bfloat16() for g in grads[1:3]] + [grads[3].half()]
    torch.testing.assert_close(grad_norm(half).double(),
                               torch.stack([g.double().pow(2).sum() for g in half]).sum().sqrt(), rtol=1e-6, atol=0)
    assert float(grad_norm([])) == 0.0
    assert grad_norm([torch.tensor([1.0, float("inf")])]).isinf()
    assert grad_norm([torch.tensor([1.0, float("nan")])]).isnan()


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # clipping active / inactive
def test_clip_inside_fused_adamw_matches_clip_then_step(max_norm):
    """clip_and_step hands the clip coefficient to fused AdamW as its grad_scale: the same update
    as torch.nn.utils.clip_grad_norm_ followed by step(), to float32 rounding."""
    from llmcore.train.optim import clip_and_step

    a, b = tiny(0, dropout=0.0), tiny(0, dropout=0.0)
    opt_a, opt_b = make_optimizer(a, 1e-2, 0.01), make_optimizer(b, 1e-2, 0.01)
    assert opt_a.param_groups[0]["fused"]
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        batch = padded(gen, 6)
        out = a(batch["input_ids"], attention_mask=batch["attention_mask"])
        F.cross_entropy(out.logits, batch["labels"]).backward()
        # b takes a's gradients: only the two update paths may differ. Its own forward would see
        # weights one rounding apart, and where a clipped gradient is as small as Adam's eps the
        # update amplifies such a difference (1.2e-6 on an embedding row after 4 steps on an AMD EPYC).
        for pa, pb in zip(a.parameters(), b.parameters()):
            pb.grad = pa.grad.clone()
        norm_a = torch.nn.utils.clip_grad_norm_(a.parameters(), max_norm)
        opt_a.step()
        norm_b = clip_and_step(opt_b, [p for p in b.parameters()], max_norm)
        torch.testing.assert_close(norm_b, norm_a, rtol=1e-6, atol=0)
        opt_a.zero_grad()
        opt_b.zero_grad()
    assert not hasattr(opt_b, "grad_scale")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6, msg=name)
        # Adam's update hardly depends on the gradients' scale; its moments do: they show the clip
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_b.state[pb][key], opt_a.state[pa][key], rtol=1e-4, atol=1e-12,
                                       msg=f"{name} {key}")



@pytest.mark.parametrize("make", [lambda ps: torch.optim.SGD(ps, lr=0.1),
                                  lambda ps: torch.optim.AdamW(ps, lr=0.1, foreach=True)])
def test_clip_then_step_without_a_fused_optimizer(make):
    """Found by a probe of the optimizer: with an optimizer that is not fused, clip_and_step handed the gradients
    to clip_grads_with_norm_, which scales parameters' .grad: nothing was clipped (SGD stepped 50x too far)."""
    from llmcore.train.optim import clip_and_step

    ours, ref = (torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)) for _ in range(2))
    opt_ours, opt_ref = make([ours]), make([ref])
    for p in (ours, ref):
        p.grad = torch.tensor([30.0, 40.0, 0.0, 0.0], dtype=torch.float64)
    norm_ref = torch.nn.utils.clip_grad_norm_([ref], 1.0)
    opt_ref.step()
    assert float(clip_and_step(opt_ours, iter([ours]), 1.0)) == float(norm_ref) == 50.0
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)


def test_make_optimizer_falls_back_where_fused_adamw_cannot_step():
    """Found by the same probe: torch's fused AdamW checks its parameters at the first step(), so the constructor's
    fallback never ran and a complex parameter failed the first step; such parameters get the unfused AdamW."""
    model = torch.nn.Linear(3, 2)
    model.register_parameter("phase", torch.nn.Parameter(torch.ones(2, dtype=torch.complex64)))
    opt = make_optimizer(model, 1e-2, 0.01)
    assert not any(g.get("fused") for g in opt.param_groups)
    model(torch.ones(1, 3)).sum().add(model.phase.abs().sum()).backward()
    opt.step()
    assert make_optimizer(torch.nn.Linear(3, 2), 1e-2, 0.01).param_groups[0]["fused"]


_HEAP_CHECK = """
import torch
from llmcore.train import retain_freed_memory

def in_heap(ptr):
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            return lo <= ptr < hi
    return False

n = 48 << 20  # above glibc's largest dynamic mmap threshold (32 MiB): a fresh mapping by default
a = torch.empty(n, dtype=torch.uint8)
before = in_heap(a.data_ptr())
del a
applied = retain_freed_memory()
b = torch.empty(n, dtype=torch.uint8)
print(before, in_heap(b.data_ptr()), applied, retain_freed_memory())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_retain_freed_memory_serves_large_blocks_from_the_heap(tmp_path):
    """retain_freed_memory() makes glibc serve a 48 MiB block from the heap (kept and reused after
    free) instead of a private mapping that free() unmaps and the next allocation page-faults anew.
    Checked in a child process (the setting is process-wide) by where the block lands."""
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    out = subprocess.run([sys.executable, "-c", _HEAP_CHECK], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    before, after, applied, again = out.stdout.split()
    assert applied == again == "True"
    assert before == "False", "glibc's default should map a 48 MiB block on its own"
    assert after == "True", "after retain_freed_memory() the block should come from the heap"


@pytest.mark.parametrize("strategy,save_steps,expected", [("epoch", 500, ["checkpoint-3"]),
                                                         ("steps", 2, ["checkpoint-2", "checkpoint-3"])])
def test_stop_at_max_steps_mid_epoch_writes_a_last_checkpoint(tmp_path, strategy, save_steps, expected):
    # 4 batches an epoch, stopped after 3: transformers' Trainer saves there too
    cfg = config(tmp_path, max_steps=3, save_strategy=strategy, save_steps=save_steps)
    Trainer(tiny(), cfg, factory(4)).train()
    assert [os.path.basename(p) for p in list_checkpoints(cfg.output_dir)] == expected
    with open(os.path.join(cfg.output_dir, "checkpoint-3", "trainer_state.json")) as f:
        state = json.load(f)
    assert (state["global_step"], state["epoch"], state["batches_in_epoch"]) == (3, 0, 3)
    # resume_from_checkpoint=True finds it: the run is complete, nothing left to do
    again = Trainer(tiny(7), config(tmp_path, max_steps=3, save_strategy="no", resume_from_checkpoint=True),
                    factory(4))
    assert again.train()["global_step"] == 3


def test_no_extra_checkpoint_when_the_last_step_was_saved(tmp_path):
    cfg = config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    Trainer(tiny(), cfg, factory(3)).train()
    assert [os.path.basename(p) for p in list_checkpoints(cfg.output_dir)] == ["checkpoint-2", "checkpoint-4"]


def _scripted(scores):
    """compute_metrics whose evaluation i reports ``scores[i]`` as ``score`` (the best-model choice is scripted)."""
    calls = []

    class Score:
        def update(self, logits, labels):
            pass

        def compute(self):
            calls.append(None)
            return {"score": scores[len(calls) - 1]}

    return Score


def _best_run(tmp_path, scores, **kw):
    gen = torch.Generator().manual_seed(13)
    batches = [padded(gen, 3) for _ in range(8)]
    settings = {"max_steps": 8, "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "steps", "save_steps": 2,
                "metric_for_best_model": "score", "report_to": "none", "disable_tqdm": True}
    trainer = Trainer(tiny(0, dropout=0.0), config(tmp_path, **{**settings, **kw}), batches,
                      eval_batches=batches[:2], compute_metrics=_scripted(scores))
    return trainer, trainer.train()


def test_load_best_model_at_end(tmp_path):
    from llmcore.train.checkpoint import load_model_weights

    out = tmp_path / "out"
    trainer, result = _best_run(tmp_path, [0.2, 0.9, 0.5, 0.1], load_best_model_at_end=True, save_total_limit=1)
    assert result["best_metric"] == 0.9 and result["best_model_checkpoint"] == str(out / "checkpoint-4")
    # the best checkpoint outlives save_total_limit=1; the newest, kept beside it during training, goes at the
    # end, as transformers' Trainer deletes it (a probe: llmcore left both)
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-4"]
    # the same run without a limit: its newest checkpoint knows the best one
    _, again = _best_run(tmp_path / "nolimit", [0.2, 0.9, 0.5, 0.1], load_best_model_at_end=True)
    other = tmp_path / "nolimit" / "out"
    assert [os.path.basename(p) for p in list_checkpoints(str(other))] == [f"checkpoint-{s}" for s in (2, 4, 6, 8)]
    with open(other / "checkpoint-8" / "trainer_state.json") as f:
        state = json.load(f)
    assert state["best_model_checkpoint"] == str(other / "checkpoint-4") and state["best_metric"] == 0.9
    # the model ends with checkpoint-4's weights, not step 8's
    best, last = tiny(5), tiny(6)
    load_model_weights(str(out / "checkpoint-4"), best)
    load_model_weights(str(other / "checkpoint-8"), last)
    for name, t in trainer.model.state_dict().items():
        assert torch.equal(t, best.state_dict()[name]), name
    assert not all(torch.equal(t, last.state_dict()[k]) for k, t in trainer.model.state_dict().items())


def test_best_model_survives_resume_and_lower_is_better(tmp_path):
    # lower is better: checkpoint-4 (0.1) until step 6, then a resumed run sees 0.3 at step 8
    _best_run(tmp_path, [0.5, 0.1, 0.4], max_steps=6, greater_is_better=False)
    trainer, result = _best_run(tmp_path, [0.3], greater_is_better=False, load_best_model_at_end=True,
                                resume_from_checkpoint=True)
    assert result["best_metric"] == 0.1 and result["best_model_checkpoint"].endswith("checkpoint-4")
    # without load_best_model_at_end the best is tracked, the model is the last step's
    trainer, result = _best_run(tmp_path / "plain", [0.2, 0.9, 0.5, 0.1])
    assert result["best_model_checkpoint"].endswith("checkpoint-4")
    last = tiny(5)
    from llmcore.train.checkpoint import load_model_weights

    load_model_weights(result["best_model_checkpoint"].replace("checkpoint-4", "checkpoint-8"), last)
    assert all(torch.equal(t, last.state_dict()[k]) for k, t in trainer.model.state_dict().items())


def test_resume_finds_the_best_checkpoint_in_a_moved_folder(tmp_path, capsys):
    """A resumed state names its best checkpoint as the first run's output_dir was spelled: after a move (or
    another working directory) rotation removed the real best and load_best_model_at_end failed after training
    (a probe found it). Now it is this run's folder of that name; one gone altogether is said and forgotten."""
    _best_run(tmp_path / "first", [0.5, 0.9, 0.4], max_steps=6, save_total_limit=2)
    shutil.move(tmp_path / "first" / "out", tmp_path / "out")
    _, result = _best_run(tmp_path, [0.3], load_best_model_at_end=True, save_total_limit=2, resume_from_checkpoint=True)
    assert result["best_model_checkpoint"] == str(tmp_path / "out" / "checkpoint-4") and result["best_metric"] == 0.9
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "out"))] == ["checkpoint-4", "checkpoint-8"]
    _best_run(tmp_path / "gone", [0.5, 0.9, 0.4], max_steps=6)
    shutil.rmtree(tmp_path / "gone" / "out" / "checkpoint-4")
    _, result = _best_run(tmp_path / "gone", [0.3], load_best_model_at_end=True, resume_from_checkpoint=True)
    assert result["best_model_checkpoint"] is None and "no longer exists" in capsys.readouterr().err


def test_resume_of_a_finished_run_and_an_empty_resume_path(tmp_path):
    """Resuming a run that already reached max_steps mid-epoch trains nothing and reports the checkpoint's epoch
    (it said 0.0); an empty resume path (an unset variable) is refused rather than read as 'start afresh'."""
    first = Trainer(tiny(0), config(tmp_path, max_steps=3, save_strategy="steps", save_steps=500), factory(4))
    done = first.train()
    again = Trainer(tiny(0), config(tmp_path, max_steps=3, resume_from_checkpoint=True), factory(4)).train()
    assert again["global_step"] == done["global_step"] == 3 and again["epoch"] == done["epoch"] == 0.75
    with pytest.raises(ValueError, match="empty path"):
        config(tmp_path, resume_from_checkpoint=" ")


def test_resume_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, capsys):
    """Restarting a run from an earlier checkpoint of its folder (other settings): rotation ranks by step, so the
    left run's later checkpoints outranked the new ones, and save_total_limit deleted the checkpoint just written
    (an epoch evaluation then failed to update its trainer_state.json) or left only the old run's, which
    resume_from_checkpoint=True then took for this run's (a probe). They are moved aside, said on stderr."""
    gen = torch.Generator().manual_seed(5)
    eval_set = [padded(gen, 3)]
    Trainer(tiny(0), config(tmp_path, max_steps=6, save_strategy="steps", save_steps=1), factory(4)).train()
    restart = config(tmp_path, max_steps=4, save_strategy="steps", save_steps=1, save_total_limit=2,
                     eval_strategy="epoch", learning_rate=1e-4,
                     resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    out = Trainer(tiny(0), restart, factory(4), eval_batches=eval_set).train()
    assert out["global_step"] == 4
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "out"))] == ["checkpoint-3", "checkpoint-4"]
    with open(tmp_path / "out" / "checkpoint-4" / "trainer_state.json") as f:
        state = json.load(f)
    assert state["config"]["learning_rate"] == 1e-4 and any("eval_loss" in r for r in state["log_history"])
    aside = tmp_path / "out" / ".superseded-after-step-2"
    assert sorted(os.listdir(aside)) == [f"checkpoint-{i}" for i in (3, 4, 5, 6)]
    assert f"moved to {str(aside)!r}" in capsys.readouterr().err
    # resume_from_checkpoint=True now continues this run, not the one left
    again = Trainer(tiny(0), config(tmp_path, max_steps=5, save_strategy="no", learning_rate=1e-4,
                                    resume_from_checkpoint=True), factory(4))
    again.train()
    assert again.log_history[:len(state["log_history"])] == state["log_history"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trainer(tiny(0), config(tmp_path / "x", max_steps=1, resume_from_checkpoint=str(tmp_path / "nope")),
                factory(4)).train()


def test_resume_into_another_model_names_the_checkpoint(tmp_path):
    """Resuming with a model of another shape said which tensor did not fit, but not which file (a probe)."""
    Trainer(tiny(0), config(tmp_path, max_steps=1, save_strategy="steps", save_steps=1), factory(4)).train()
    other = EncoderForSequenceClassification(EncoderConfig(vocab_size=100, hidden_size=24, num_layers=1, num_heads=2,
                                                           intermediate_size=32, max_position_embeddings=32))
    with pytest.raises(CheckpointError, match=r"checkpoint-1/model.safetensors' does not fit the model .*unexpected"):
        Trainer(other, config(tmp_path, max_steps=2, resume_from_checkpoint=True), factory(4)).train()


def test_resume_with_other_batching_is_said(tmp_path, capsys):
    """A resume whose batch size or accumulation differs from the checkpoint's run skips batches counted in the
    old size: said on stderr, as transformers warns (it was silent)."""
    Trainer(tiny(0), config(tmp_path, max_steps=2, save_strategy="steps", save_steps=2), factory(4)).train()
    capsys.readouterr()
    Trainer(tiny(0), config(tmp_path, max_steps=3, resume_from_checkpoint=True), factory(4)).train()
    assert "resuming" not in capsys.readouterr().err
    Trainer(tiny(0), config(tmp_path, max_steps=4, resume_from_checkpoint=True, gradient_accumulation_steps=2),
            factory(4)).train()
    assert "gradient_accumulation_steps=2 (the checkpoint's run: 1)" in capsys.readouterr().err
    with open(tmp_path / "out" / "checkpoint-2" / "trainer_state.json") as f:
        assert json.load(f)["world_size"] == 1
    # the batch compared is the global one (a probe under torchrun): 2 ranks of 8 resumed as 1 process of 16 is that
    # run continued (it was said not to be), as 1 process of 8 is not (it was silent)
    from llmcore.train.loop import _note_changed_batching

    saved = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}
    for batch, world, said in ((16, 1, False), (8, 2, False), (4, 4, False), (8, 1, True), (16, 2, True)):
        _note_changed_batching(saved, 2, config(tmp_path, per_device_train_batch_size=batch), world, "ckpt")
        err = capsys.readouterr().err
        assert bool(err) == said and (not said or f"a global batch of {batch} x {world} rank(s) (the checkpoint's "
                                      "run: 8 x 2)" in err), (batch, world, err)
    _note_changed_batching(saved, None, config(tmp_path, per_device_train_batch_size=16), 1, "ckpt")  # (older)
    assert "per_device_train_batch_size=16 (the checkpoint's run: 8)" in capsys.readouterr().err


def test_compute_metrics_tensors_and_numpy_values(tmp_path):
    """compute() values that are tensors or NumPy scalars (torchmetrics-style) crashed the first evaluation's log
    line (not JSON); they are reported as Python numbers, as transformers does, and an eval_ name keeps its name."""
    import numpy as np

    class Tensors:
        def update(self, logits, labels):
            pass

        def compute(self):
            return {"score": torch.tensor(0.25), "eval_hits": np.float32(0.5), "per_class": torch.tensor([1.0, 2.0])}

    gen = torch.Generator().manual_seed(13)
    batches = [padded(gen, 3) for _ in range(4)]
    trainer = Trainer(tiny(0), config(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                                      save_steps=2, metric_for_best_model="score", report_to="none"),
                      batches, eval_batches=batches[:2], compute_metrics=Tensors)
    assert trainer.train()["best_metric"] == 0.25
    metrics = trainer.evaluate()
    assert (metrics["eval_score"], metrics["eval_hits"], metrics["eval_per_class"]) == (0.25, 0.5, [1.0, 2.0])
    assert all(type(metrics[k]) in (float, list) for k in ("eval_score", "eval_hits", "eval_per_class"))


def test_damaged_trainer_state_and_foreign_files_are_named(tmp_path):
    """A damaged trainer_state.json (cut short, a key gone) and an optimizer.pt of foreign bytes gave a bare JSON
    message, a KeyError traceback, a KeyError(101): each is now a CheckpointError naming the file (a probe)."""
    from llmcore.train.checkpoint import CheckpointError

    Trainer(tiny(0), config(tmp_path, max_steps=1, save_strategy="steps", save_steps=1), factory(2)).train()
    good = tmp_path / "out" / "checkpoint-1"
    state = (good / "trainer_state.json").read_text()
    damages = {"trainer_state.json": [state[:30], state.replace('"epoch"', '"epochs"'), "[]"],
               "optimizer.pt": ["hello"]}
    for name, contents in damages.items():
        for text in contents:
            ckpt = tmp_path / "damaged" / "checkpoint-1"
            shutil.rmtree(tmp_path / "damaged", ignore_errors=True)
            shutil.copytree(good, ckpt)
            (ckpt / name).write_text(text)
            trainer = Trainer(tiny(1), config(tmp_path / "damaged", max_steps=2, resume_from_checkpoint=str(ckpt)),
                              factory(2))
            with pytest.raises(CheckpointError, match=name):
                trainer.train()


def test_resumed_run_logs_each_step_once(tmp_path):
    """train_log.jsonl of a run killed after its last checkpoint and resumed held the killed run's later steps
    and then the resumed run's again (a probe found 6, 7, 8 twice); it now drops them at the resume, and
    an evaluation after the resumed run keeps its records."""
    def steps():
        with open(tmp_path / "out" / "logs" / "train_log.jsonl", encoding="utf-8") as f:
            return [json.loads(line)["step"] for line in f]

    gen = torch.Generator().manual_seed(13)
    evals = [padded(gen, 3)]
    Trainer(tiny(0), config(tmp_path, max_steps=8, save_strategy="steps", save_steps=5), factory(5)).train()
    shutil.rmtree(tmp_path / "out" / "checkpoint-8")  # killed between step 8's log line and its checkpoint
    with open(tmp_path / "out" / "logs" / "train_log.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 8, "lo')  # and cut short mid-line
    trainer = Trainer(tiny(0), config(tmp_path, max_steps=8, resume_from_checkpoint=True), factory(5),
                      eval_batches=evals)
    trainer.train()
    # (the last: the resumed run's summary record, as transformers' Trainer logs at the end of train())
    assert steps() == [r["step"] for r in trainer.log_history] == list(range(1, 9)) + [8]
    assert "train_runtime" in trainer.log_history[-1] and "loss" not in trainer.log_history[-1]
    trainer.log({"step": trainer.global_step, **trainer.evaluate()})
    assert steps() == list(range(1, 9)) + [8, 8]


def test_resume_on_more_ranks_takes_rank_0s_random_state(tmp_path, capsys):
    """A checkpoint written by fewer ranks than resume it has no RNG file for the new ranks: they take rank 0's,
    said on stderr, as transformers goes on with a warning (it was refused, though the README promised resumes on
    any number of ranks)."""
    from llmcore.train.checkpoint import load_checkpoint

    trainer = Trainer(tiny(0), config(tmp_path, max_steps=1, save_strategy="steps", save_steps=1), factory(2))
    trainer.train()
    capsys.readouterr()
    state = load_checkpoint(str(tmp_path / "out" / "checkpoint-1"), trainer.model, trainer.optimizer,
                            trainer.scheduler, rank=1)
    assert state["global_step"] == 1 and "rank 1 resumes with rank 0's random state" in capsys.readouterr().err
    # a rank that wrote the checkpoint (world_size 2 in its state) and whose file is gone: incomplete, not "written
    # by fewer ranks" (found by a probe of sharded checkpoints)
    state_file = tmp_path / "out" / "checkpoint-1" / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "world_size": 2}))
    with pytest.raises(FileNotFoundError, match="rng_state_1.pt' is missing: the checkpoint is incomplete"):
        load_checkpoint(str(tmp_path / "out" / "checkpoint-1"), trainer.model, trainer.optimizer, trainer.scheduler,
                        rank=1)


def test_best_model_settings(tmp_path):
    assert TrainConfig("o").metric_for_best_model is None and TrainConfig("o").greater_is_better is None
    c = TrainConfig("o", load_best_model_at_end=True, eval_strategy="epoch", save_strategy="epoch")
    assert c.metric_for_best_model == "loss" and c.greater_is_better is False
    assert TrainConfig("o", metric_for_best_model="eval_accuracy").greater_is_better is True
    # llmcore's eval_perplexity (transformers reports none; its rule made it greater-is-better and the worst
    # checkpoint was kept and loaded: a CLI probe) is lower-is-better, as a loss
    for name in ("perplexity", "eval_perplexity"):
        assert TrainConfig("o", metric_for_best_model=name).greater_is_better is False
    assert TrainConfig("o", metric_for_best_model="perplexity", greater_is_better=True).greater_is_better is True
    with pytest.raises(ValueError, match="both 'steps' or both 'epoch'"):
        TrainConfig("o", load_best_model_at_end=True, eval_strategy="epoch", save_strategy="steps")
    with pytest.raises(ValueError, match=r"save_steps \(5\) must be a multiple of eval_steps \(2\)"):
        TrainConfig("o", load_best_model_at_end=True, eval_strategy="steps", eval_steps=2, save_steps=5)
    with pytest.raises(ValueError, match="metric_for_best_model must be"):
        TrainConfig("o", metric_for_best_model="")
    with pytest.raises(TypeError, match="greater_is_better must be a bool"):
        TrainConfig("o", metric_for_best_model="f1", greater_is_better="yes")
    for name in ("bf16", "pack", "disable_tqdm"):  # (a probe: "false" was truthy, bf16 on or packed batches)
        with pytest.raises(TypeError, match=f"{name} must be a bool, got 'false'"):
            TrainConfig("o", **{name: "false"})
    # a metric the evaluation does not report: named, with the ones it does
    with pytest.raises(ValueError, match=r"has no 'eval_bleu'; it has \['eval_accuracy'"):
        _best_run(tmp_path, [0.1], metric_for_best_model="bleu")
    # without compute_metrics the evaluation's names are known: an unknown one is refused before any step
    gen = torch.Generator().manual_seed(13)
    batches = [padded(gen, 3) for _ in range(2)]
    watching = config(tmp_path / "w", max_steps=2, eval_strategy="steps", eval_steps=1, save_strategy="no",
                      metric_for_best_model="bleu")
    with pytest.raises(ValueError, match=r"metric_for_best_model='bleu': the evaluation of a classifier reports "
                                         r"loss, examples, accuracy, f1, runtime, samples_per_second, "
                                         r"steps_per_second \(eval_ prefix optional\)"):
        Trainer(tiny(0), watching, batches, eval_batches=batches)
    assert not os.path.exists(tmp_path / "w")
    # text-level names only where the batches may be windows of longer texts (a factory's may)
    watching.metric_for_best_model = "eval_text_f1"
    with pytest.raises(ValueError, match="reports loss, examples, accuracy, f1, runtime"):
        Trainer(tiny(0), watching, batches, eval_batches=batches)
    Trainer(tiny(0), watching, batches, eval_batches=lambda: batches)
    for name in ("f1", "eval_accuracy", "eval_loss", "eval_runtime"):  # (the speed metrics too, as transformers)
        watching.metric_for_best_model = name
        Trainer(tiny(0), watching, batches, eval_batches=batches)


def _hf_evaluated_steps(max_steps, eval_steps):
    """The steps at which transformers' DefaultFlowCallback evaluates a run of max_steps with eval_strategy steps."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState
    from transformers.trainer_callback import DefaultFlowCallback
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    args = SimpleNamespace(logging_first_step=False, logging_strategy=IntervalStrategy.NO, eval_delay=0,
                           eval_strategy=IntervalStrategy.STEPS, save_strategy=SaveStrategy.NO)
    state, evaluated = TrainerState(max_steps=max_steps, eval_steps=eval_steps, logging_steps=500, save_steps=500), []
    for step in range(1, max_steps + 1):
        state.global_step, control = step, TrainerControl()
        if DefaultFlowCallback().on_step_end(args, state, control).should_evaluate:
            evaluated.append(step)
    return evaluated


def test_the_last_step_is_evaluated_and_can_be_the_best(tmp_path):
    """A run ending off the eval grid (9 steps, every 2) is evaluated at its last step too, as transformers'
    DefaultFlowCallback does, and that last checkpoint can be the best one loaded (it was never compared); a run
    that max_steps ends inside an epoch ends it with the epoch evaluation, as transformers' on_epoch_end."""
    assert _hf_evaluated_steps(9, 2) == [2, 4, 6, 8, 9]
    trainer, result = _best_run(tmp_path, [0.1, 0.2, 0.3, 0.4, 0.9], max_steps=9, load_best_model_at_end=True)
    assert [r["step"] for r in trainer.log_history if "eval_score" in r] == [2, 4, 6, 8, 9]
    assert result["best_model_checkpoint"].endswith("checkpoint-9") and result["best_metric"] == 0.9
    assert result["epoch"] == pytest.approx(9 / 8)  # (8 batches an epoch: a float, as transformers' epoch)

    gen = torch.Generator().manual_seed(13)
    batches = [padded(gen, 3) for _ in range(6)]
    cfg = config(tmp_path / "e", max_steps=9, eval_strategy="epoch", report_to="none", disable_tqdm=True)
    trainer = Trainer(tiny(0), cfg, batches, eval_batches=batches[:2])
    assert trainer.train()["epoch"] == 1.5
    assert [(r["step"], r["epoch"]) for r in trainer.log_history if "eval_loss" in r] == [(6, 1), (9, 1.5)]


def test_a_spent_one_shot_train_iterator_stops_the_run(tmp_path, capsys):
    """A generator of training batches (max_steps set: it has no len) is spent after one pass. The run trained that
    pass, then failed with "yielded no batches" (a probe), its end-of-run records lost; now it stops there, as
    transformers' Trainer stops when an epoch of its data yields nothing, and the same steps as a list's run."""
    gen = torch.Generator().manual_seed(13)
    batches = [padded(gen, 3) for _ in range(5)]
    cfg = config(tmp_path / "gen", max_steps=8, eval_strategy="epoch", report_to="none", disable_tqdm=True)
    trainer = Trainer(tiny(0), cfg, (b for b in batches), eval_batches=batches[:2])
    result = trainer.train()
    out = capsys.readouterr().out
    assert "one-shot iterator (generator)" in out and "stops at step 5 of 8" in out
    assert result["global_step"] == 5 and result["epoch"] == 1
    assert [r["step"] for r in trainer.log_history if "loss" in r] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in trainer.log_history if "eval_loss" in r] == [5]
    # the same 5 steps as a list over 8 steps (the learning rate planned for 8), stopped after 5
    listed = Trainer(tiny(0), config(tmp_path / "list", max_steps=8, report_to="none", disable_tqdm=True), batches)
    listed.train_batches = lambda epoch: batches if epoch == 0 else []
    with pytest.raises(ValueError, match=r"train_batches\(1\) yielded no batches$"):
        listed.train()
    for a, b in zip(trainer.model.parameters(), listed.model.parameters()):
        assert torch.equal(a, b)
    # a train() again has nothing to train: refused, naming why
    with pytest.raises(ValueError, match=r"yielded no batches: a one-shot iterator \(generator\) is spent"):
        trainer.train()


def test_one_shot_eval_batches_are_refused(tmp_path):
    """A generator of evaluation batches is spent after the first evaluation: the next ones saw no batches and
    reported a NaN loss silently (a probe), which no best-model comparison ever picks. Refused when the Trainer
    is made, naming what to pass; a list and a callable returning a generator evaluate every time."""
    gen = torch.Generator().manual_seed(13)
    batches = [padded(gen, 3), packed(gen, 4)]
    cfg = config(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2)
    for one_shot in ((b for b in batches), iter(batches), map(dict, batches)):
        with pytest.raises(TypeError, match="one-shot iterator"):
            Trainer(tiny(0), cfg, factory(4), eval_batches=one_shot)
    for fine in (batches, lambda: (b for b in batches)):
        trainer = Trainer(tiny(0), cfg, factory(4), eval_batches=fine)
        trainer.train()
        evals = [r for r in trainer.log_history if "eval_loss" in r]
        assert len(evals) == 2 and all(r["eval_examples"] == 7 and math.isfinite(r["eval_loss"]) for r in evals)


def test_an_evaluation_without_labelled_rows_is_nan(tmp_path):
    """Every label ignored: NaN loss, accuracy and F1 (as transformers' loss), not a perfect 0.0 that would win
    every best-model comparison; an empty list of evaluation batches is refused when the Trainer is made."""
    gen = torch.Generator().manual_seed(13)
    batch = padded(gen, 3)
    ignored = dict(batch, labels=torch.full((3,), -100))
    out = Trainer(tiny(0), config(tmp_path), [batch], eval_batches=[ignored]).evaluate()
    assert out["eval_examples"] == 0 and all(math.isnan(out[k]) for k in ("eval_loss", "eval_accuracy", "eval_f1"))
    with pytest.raises(ValueError, match="eval_batches is empty"):
        Trainer(tiny(0), config(tmp_path, eval_strategy="steps"), [batch], eval_batches=[])
    from llmcore.models import DecoderConfig, DecoderForCausalLM

    lm = DecoderForCausalLM(DecoderConfig(vocab_size=100, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                                          head_dim=8, intermediate_size=32, max_position_embeddings=16))
    ids = batch["input_ids"]
    out = Trainer(lm, config(tmp_path), [dict(input_ids=ids, labels=ids)],
                  eval_batches=[dict(input_ids=ids, labels=torch.full_like(ids, -100))]).evaluate()
    assert out["eval_tokens"] == 0 and math.isnan(out["eval_loss"]) and math.isnan(out["eval_perplexity"])


def test_a_regression_reports_no_accuracy(tmp_path):
    """A one-output head (regression) evaluates loss and examples only: accuracy as the watched metric is refused
    when the Trainer is made (it failed at the first evaluation)."""
    torch.manual_seed(0)
    model = EncoderForSequenceClassification(EncoderConfig(vocab_size=100, hidden_size=32, num_layers=1, num_heads=4,
                                                           intermediate_size=64, num_labels=1))
    gen = torch.Generator().manual_seed(13)
    batch = dict(padded(gen, 3), labels=torch.randn(3, generator=gen))
    watching = config(tmp_path, eval_strategy="steps", eval_steps=1, metric_for_best_model="accuracy")
    with pytest.raises(ValueError, match="the evaluation of a regression reports loss, examples"):
        Trainer(model, watching, [batch], eval_batches=[batch])
    watching.metric_for_best_model = "loss"
    assert set(Trainer(model, watching, [batch], eval_batches=[batch]).evaluate()) == {
        "eval_loss", "eval_examples", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


def _hf_stop_step(scores, patience, threshold, greater, eval_steps=2):
    """The step at which transformers' EarlyStoppingCallback stops a run whose evaluation i (every eval_steps
    steps) reports scores[i], with the best metric updated after each evaluation by transformers' own
    Trainer._determine_best_metric, in that order (as Trainer._maybe_log_save_evaluate runs them); None: never."""
    from types import SimpleNamespace

    from transformers import EarlyStoppingCallback, TrainerControl, TrainerState
    from transformers import Trainer as HfTrainer

    callback = EarlyStoppingCallback(patience, threshold)
    args = SimpleNamespace(metric_for_best_model="score", greater_is_better=greater, save_strategy="steps")
    state, control = TrainerState(), TrainerControl()
    for i, score in enumerate(scores):
        state.global_step = (i + 1) * eval_steps
        callback.on_evaluate(args, state, control, metrics={"eval_score": score})
        HfTrainer._determine_best_metric(SimpleNamespace(args=args, state=state), {"eval_score": score}, None)
        if control.should_training_stop:
            return state.global_step
    return None


@pytest.mark.parametrize("scores,patience,threshold,greater", [
    ([0.2, 0.5, 0.5, 0.6, 0.55, 0.58, 0.9, 0.95], 2, 0.0, True),    # equal is no improvement
    ([0.5, 0.47, 0.40, 0.38, 0.37, 0.2, 0.1, 0.05], 2, 0.05, False),  # improvements within the threshold count
    ([0.2, 0.1, 0.3, 0.25, 0.4, 0.35, 0.5, 0.45], 2, 0.0, True),      # never twice in a row: no stop
])
def test_early_stopping_matches_transformers(tmp_path, scores, patience, threshold, greater):
    from llmcore.train.checkpoint import load_model_weights

    expected = _hf_stop_step(scores, patience, threshold, greater)
    trainer, result = _best_run(tmp_path, scores, max_steps=16, greater_is_better=greater, load_best_model_at_end=True,
                                early_stopping_patience=patience, early_stopping_threshold=threshold)
    assert result["global_step"] == (expected or 16)
    stops = [r for r in trainer.log_history if "early_stopping" in r]
    assert [r["step"] for r in stops] == ([expected] if expected else [])
    assert len([r for r in trainer.log_history if "eval_score" in r]) == result["global_step"] // 2
    # the best checkpoint's weights are loaded at the end, as without early stopping
    seen = scores[:result["global_step"] // 2]
    best_step = 2 * (seen.index(max(seen) if greater else min(seen)) + 1)
    assert result["best_model_checkpoint"].endswith(f"checkpoint-{best_step}")
    best = tiny(5)
    load_model_weights(result["best_model_checkpoint"], best)
    for name, t in trainer.model.state_dict().items():
        assert torch.equal(t, best.state_dict()[name]), name


def test_early_stopping_resumes_its_count(tmp_path):
    # one evaluation without improvement by step 6; the resumed run's first (step 8) is the second
    _best_run(tmp_path, [0.2, 0.5, 0.5], max_steps=6, early_stopping_patience=2)
    with open(tmp_path / "out" / "checkpoint-6" / "trainer_state.json") as f:
        assert json.load(f)["early_stopping"] == {"best": 0.5, "patience_counter": 1}
    _, result = _best_run(tmp_path, [0.4, 0.9], max_steps=16, early_stopping_patience=2,
                          resume_from_checkpoint=True)
    assert result["global_step"] == _hf_stop_step([0.2, 0.5, 0.5, 0.4], 2, 0.0, True) == 8


def test_early_stopping_by_epoch(tmp_path):
    gen = torch.Generator().manual_seed(13)
    batches = [padded(gen, 3) for _ in range(2)]
    cfg = config(tmp_path, num_train_epochs=10, eval_strategy="epoch", save_strategy="epoch",
                 metric_for_best_model="score", early_stopping_patience=1, report_to="none", disable_tqdm=True)
    trainer = Trainer(tiny(0, dropout=0.0), cfg, batches, eval_batches=batches[:1],
                      compute_metrics=_scripted([0.3, 0.6, 0.6, 0.9]))
    result = trainer.train()
    assert result["global_step"] == 6 == _hf_stop_step([0.3, 0.6, 0.6], 1, 0.0, True)
    assert [os.path.basename(p) for p in list_checkpoints(cfg.output_dir)] == ["checkpoint-2", "checkpoint-4",
                                                                                "checkpoint-6"]


@contextlib.contextmanager
def _gloo(rank, world, init_file):
    """A spawned test worker's gloo group, one thread; a rank left waiting in a collective fails in a minute
    instead of hanging the test."""
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _early_stop_worker(rank, world, init_file, out_dir):
    with _gloo(rank, world, init_file):
        gen = torch.Generator().manual_seed(13)
        batches = [padded(gen, 2) for _ in range(16)]
        # compute_metrics sees only its rank's rows: here the ranks' scores disagree, and rank 1's alone would
        # stop at step 6 with checkpoint-2 the best, rank 0's at step 8 with checkpoint-4
        scores = [0.2, 0.5, 0.5, 0.5, 0.5] if rank == 0 else [0.9, 0.1, 0.1, 0.1, 0.1]
        cfg = TrainConfig(str(out_dir), max_steps=10, warmup_steps=1, learning_rate=1e-3, logging_steps=1,
                          eval_strategy="steps", eval_steps=2, metric_for_best_model="score",
                          early_stopping_patience=2, save_strategy="steps", save_steps=2, report_to="none",
                          disable_tqdm=True)
        trainer = Trainer(tiny(0, dropout=0.0), cfg, batches, eval_batches=batches[:1],
                          compute_metrics=_scripted(scores))
        result = trainer.train()
        with open(os.path.join(str(out_dir), f"steps_{rank}"), "w") as f:
            f.write(f"{result['global_step']} {os.path.basename(result['best_model_checkpoint'])}")


def test_early_stopping_ranks_agree(tmp_path):
    import torch.multiprocessing as mp
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_early_stop_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    assert [(out / f"steps_{r}").read_text() for r in (0, 1)] == ["8 checkpoint-4", "8 checkpoint-4"]


def _eval_rows_on_one_rank_worker(rank, world, init_file, out_dir):
    with _gloo(rank, world, init_file):
        gen = torch.Generator().manual_seed(13)
        batches = [padded(gen, 2) for _ in range(4)]
        evals = [padded(gen, 3)] if rank == 0 else []  # a split of fewer rows than ranks: rank 1 gets none
        cfg = TrainConfig(str(out_dir), max_steps=4, warmup_steps=1, learning_rate=1e-3, eval_strategy="steps",
                          eval_steps=2, save_strategy="steps", save_steps=2, metric_for_best_model="score",
                          load_best_model_at_end=True, report_to="none", disable_tqdm=True)
        trainer = Trainer(tiny(0, dropout=0.0), cfg, batches, eval_batches=evals,
                          compute_metrics=_scripted([0.1, 0.2, 0.3]))  # the last checkpoint is the best
        trainer.train()
        metrics = trainer.evaluate()
        with open(os.path.join(str(out_dir), f"eval_{rank}.json"), "w") as f:
            json.dump({k: metrics[k] for k in ("eval_examples", "eval_accuracy", "eval_f1")}, f)


def _uneven_batches_worker(rank, world, init_file, out_dir):
    with _gloo(rank, world, init_file):
        gen = torch.Generator().manual_seed(13)
        batches = [padded(gen, 2) for _ in range(4 - rank)]
        try:
            Trainer(tiny(0), TrainConfig(str(out_dir), max_steps=4, save_strategy="no"), batches).train()
        except ValueError as e:
            (out_dir / f"error_{rank}").write_text(str(e))


def test_ranks_with_unequal_batch_counts_are_refused(tmp_path):
    """Ranks with different numbers of training batches aborted inside gloo (SIGABRT, found by a probe): every
    rank now stops with an error naming the counts."""
    import torch.multiprocessing as mp
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_uneven_batches_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    assert [(out / f"error_{r}").read_text()[:58] for r in (0, 1)] == [
        "the ranks have 3 to 4 training batches per epoch (this one"] * 2


def test_ranks_without_evaluation_rows_and_the_last_checkpoint_best(tmp_path):
    """Found by a probe under torchrun: a rank without evaluation rows (a split of fewer rows than ranks) skipped
    the counts' all-reduce the others entered, and hung (or was refused its empty eval_batches); ranks other
    than 0 loaded the best checkpoint before rank 0 had renamed it into place (FileNotFoundError) when it was
    the last one saved. Both ranks now report the one-process metrics and end."""
    import torch.multiprocessing as mp
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_eval_rows_on_one_rank_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    ranks = [json.loads((out / f"eval_{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["eval_examples"] == 3 and 0.0 <= ranks[0]["eval_accuracy"] <= 1.0


def test_early_stopping_settings():
    with pytest.raises(ValueError, match="needs metric_for_best_model"):
        TrainConfig("o", eval_strategy="steps", early_stopping_patience=2)
    with pytest.raises(ValueError, match="needs evaluations"):
        TrainConfig("o", metric_for_best_model="f1", early_stopping_patience=2)
    with pytest.raises(ValueError, match="early_stopping_patience must be >= 1"):
        TrainConfig("o", eval_strategy="steps", metric_for_best_model="f1", early_stopping_patience=0)
    with pytest.raises(TypeError, match="early_stopping_patience must be an int"):
        TrainConfig("o", eval_strategy="steps", metric_for_best_model="f1", early_stopping_patience="2")
    with pytest.raises(ValueError, match="early_stopping_threshold must be a finite number >= 0.0, got -0.1"):
        TrainConfig("o", eval_strategy="steps", metric_for_best_model="f1", early_stopping_patience=2,
                    early_stopping_threshold=-0.1)
    # load_best_model_at_end defaults the metric to the loss, which early stopping then watches
    c = TrainConfig("o", eval_strategy="steps", save_strategy="steps", load_best_model_at_end=True,
                    early_stopping_patience=3)
    assert (c.metric_for_best_model, c.greater_is_better, c.early_stopping_threshold) == ("loss", False, 0.0)


def test_rotation_keeps_the_best(tmp_path):
    from llmcore.train.checkpoint import rotate_checkpoints

    def folders(steps, limit, keep):
        out = tmp_path / f"r{limit}-{keep}"
        for s in steps:
            os.makedirs(out / f"checkpoint-{s}")
        rotate_checkpoints(str(out), limit, keep=None if keep is None else str(out / f"checkpoint-{keep}"))
        return [int(os.path.basename(p).split("-")[1]) for p in list_checkpoints(str(out))]

    assert folders([2, 4, 6, 8], 2, 4) == [4, 8]  # the best counts toward the limit
    assert folders([2, 4, 6, 8], 1, 4) == [4, 8]  # a limit of 1 keeps the best and the newest
    assert folders([2, 4, 6, 8], 1, 8) == [8]  # the best is the newest
    assert folders([2, 4, 6, 8], 3, 2) == [2, 6, 8]
    assert folders([2, 4, 6, 8], 2, None) == [6, 8]


def test_loss_sum_shape_errors():
    """loss_sum takes (n, C) logits and (n,) labels; anything else is a ValueError naming the shapes, not
    cross_entropy's 'Expected target size' from deep inside ((n, C) float labels are not taken as probabilities).
    Per-token labels through the Trainer: tests/test_train_lm.py."""
    from llmcore.train.loop import loss_sum

    with pytest.raises(ValueError, match=r"got logits \(2, 7, 100\) and labels \(2, 7\) \(per-token labels: a causal"):
        loss_sum(torch.randn(2, 7, 100), torch.randint(0, 100, (2, 7)))
    with pytest.raises(ValueError, match=r"got logits \(3, 4\) and labels \(3, 4\)"):
        loss_sum(torch.randn(3, 4), torch.rand(3, 4))
    with pytest.raises(ValueError, match=r"got logits \(3, 4\) and labels \(2,\)"):
        loss_sum(torch.randn(3, 4), torch.tensor([0, 1]))


def test_label_smoothing_matches_transformers(tmp_path):
    """label_smoothing_factor: the loop's loss against transformers' LabelSmoother, ignored labels included; the
    evaluation loss smoothed as transformers' Trainer smooths it."""
    from transformers.trainer_pt_utils import LabelSmoother

    from llmcore.train.loop import loss_sum

    gen = torch.Generator().manual_seed(21)
    logits = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (12,), generator=gen)
    labels[[2, 7]] = -100
    theirs = LabelSmoother(epsilon=0.1)({"logits": logits}, labels)
    ours = loss_sum(logits, labels, 0.1) / 10
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    assert abs(float(loss_sum(logits, labels, 0.1)) - float(loss_sum(logits, labels))) > 1e-3  # it smooths
    # the loop: evaluation of the same model and batches, with and without smoothing
    batches = [padded(gen, 4) for _ in range(3)]
    model = tiny(2, dropout=0.0)
    smoothed = Trainer(model, config(tmp_path, label_smoothing_factor=0.2, report_to="none"), batches,
                       eval_batches=batches).evaluate()
    with torch.no_grad():
        expected = sum(float(LabelSmoother(epsilon=0.2)(
            {"logits": model(**{k: v for k, v in b.items() if k != "labels"}).logits.double()}, b["labels"])) * 4
            for b in batches) / 12
    assert smoothed["eval_loss"] == pytest.approx(expected, rel=1e-5)
    # the training step's loss (a mean over the window's examples) too
    model.train()
    loss, n = accumulate_gradients(model, batches, label_smoothing=0.2)
    assert n == 12 and float(loss) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="label_smoothing_factor must be"):
        TrainConfig("o", label_smoothing_factor=1.5)


def test_epoch_evaluation_after_a_steps_save_tracks_that_checkpoint(tmp_path):
    """eval_strategy 'epoch' with save_strategy 'steps': at an epoch's last step the checkpoint was written before
    the epoch's evaluation, so no checkpoint ever had an evaluation, best_metric stayed None and save_total_limit
    deleted the best one (a probe; transformers names the checkpoint of the step it evaluates). Epochs of 4 steps,
    saves every 4: each checkpoint is compared by the epoch's evaluation after it."""
    gen = torch.Generator().manual_seed(13)
    batches = [padded(gen, 3) for _ in range(4)]
    trainer = Trainer(tiny(0, dropout=0.0), config(tmp_path, num_train_epochs=3, eval_strategy="epoch",
                                                   save_strategy="steps", save_steps=4, save_total_limit=1,
                                                   metric_for_best_model="score", report_to="none",
                                                   disable_tqdm=True),
                      batches, eval_batches=batches[:2], compute_metrics=_scripted([0.3, 0.9, 0.5]))
    result = trainer.train()
    out = tmp_path / "out"
    assert result["best_metric"] == 0.9 and result["best_model_checkpoint"] == str(out / "checkpoint-8")
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-8"]
    with open(out / "checkpoint-8" / "trainer_state.json") as f:
        state = json.load(f)
    # the state as a checkpoint written after that evaluation would hold it: its record and early stopping's count
    # (a resume lost the evaluation and ran past the stop: a probe)
    assert state["best_model_checkpoint"] == str(out / "checkpoint-8")
    assert any(r.get("step") == 8 and "eval_score" in r for r in state["log_history"])


def test_resume_after_an_epoch_evaluation_that_followed_a_save_continues(tmp_path):
    """Early stopping by epoch evaluations with steps saving: a run resumed from a checkpoint written just before an
    epoch's evaluation stops where the uninterrupted run stops, with the same weights."""
    gen = torch.Generator().manual_seed(13)
    batches = [padded(gen, 3) for _ in range(4)]
    kw = dict(num_train_epochs=6, eval_strategy="epoch", save_strategy="steps", save_steps=4,
              metric_for_best_model="score", early_stopping_patience=2, report_to="none", disable_tqdm=True)
    scores = [0.3, 0.9, 0.5, 0.4, 0.95, 0.1]
    whole = Trainer(tiny(0, dropout=0.0), config(tmp_path / "whole", **kw), batches, eval_batches=batches[:2],
                    compute_metrics=_scripted(scores))
    done = whole.train()
    assert done["global_step"] == 16  # (two epochs without beating 0.9 after the second)
    with pytest.raises(IndexError):  # (the run dies at its third evaluation, after checkpoint-8 and the second)
        Trainer(tiny(0, dropout=0.0), config(tmp_path / "cut", **kw), batches, eval_batches=batches[:2],
                compute_metrics=_scripted(scores[:2])).train()
    resumed = Trainer(tiny(0, dropout=0.0), config(tmp_path / "cut", resume_from_checkpoint=str(
        tmp_path / "cut" / "out" / "checkpoint-8"), **kw), batches, eval_batches=batches[:2],
        compute_metrics=_scripted(scores[2:]))
    again = resumed.train()
    assert again["global_step"] == 16 and again["best_metric"] == done["best_metric"] == 0.9
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_wrapped_models(tmp_path):
    """A model the caller wrapped in DDP trained, then failed at its first save (the wrapper has no config); a
    torch.compile(model) wrapper saved under '_orig_mod.' names (a probe). DDP's module is what is saved now;
    the compile wrapper is refused when saving, naming model.compile()."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny(0, dropout=0.0)
        Trainer(nn.parallel.DistributedDataParallel(model), config(tmp_path, max_steps=2, save_strategy="steps",
                                                                   save_steps=1, report_to="none"), factory(2)).train()
        assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "out"))] == ["checkpoint-1",
                                                                                           "checkpoint-2"]
    finally:
        dist.destroy_process_group()
    with pytest.raises(TypeError, match=r"compile the model in place \(model.compile\(\)\)"):
        Trainer(torch.compile(tiny(0)), config(tmp_path, save_strategy="steps"), factory(2))


def test_early_stop_writes_no_extra_checkpoint_and_config_edges(tmp_path):
    """An early stop off the save grid wrote a last checkpoint transformers does not write (a probe: it left
    [checkpoint-4, checkpoint-6] where transformers leaves [checkpoint-4]); report_to=None was a bare TypeError
    and max_grad_norm=inf (transformers: measure, never clip) was refused; a module llmcore cannot checkpoint failed
    at its first save, mid-run."""
    _, result = _best_run(tmp_path, [0.5, 0.4, 0.3], max_steps=16, save_steps=4, early_stopping_patience=2)
    assert result["global_step"] == 6
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "out"))] == ["checkpoint-4"]
    # a stop at the run's last step still writes it, as transformers saves at max_steps whatever stopped it
    _, result = _best_run(tmp_path / "last", [0.5, 0.4, 0.3], max_steps=6, save_steps=4, early_stopping_patience=2)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "last" / "out"))] == ["checkpoint-4",
                                                                                              "checkpoint-6"]
    assert config(tmp_path, report_to=None).report_to == config(tmp_path, report_to="none").report_to == ()
    runs = {}
    for norm in (0.0, math.inf):
        trainer = Trainer(tiny(0, dropout=0.0), config(tmp_path / str(norm), max_steps=2, max_grad_norm=norm,
                                                       report_to="none", disable_tqdm=True), factory(2))
        trainer.train()
        runs[norm] = ([r["grad_norm"] for r in trainer.log_history if "grad_norm" in r],
                      [p.detach().clone() for p in trainer.model.parameters()])
    assert runs[0.0][0] == runs[math.inf][0] and all(map(torch.equal, runs[0.0][1], runs[math.inf][1]))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, input_ids, labels=None, **kw):
            return SimpleNamespace(logits=self.lin(input_ids.float()))
    with pytest.raises(TypeError, match="save_strategy='steps' writes checkpoints of llmcore's or transformers'"):
        Trainer(Net(), config(tmp_path, save_strategy="steps"), factory(2))


def test_a_new_run_sets_an_earlier_runs_log_aside(tmp_path):
    """Found by a probe of logging parity: a second fresh Trainer run into the same output_dir appended to the first
    run's train_log.jsonl and TensorBoard files (two records at every step). The earlier run's are moved into
    logs/earlier-run-1/, kept apart as transformers' per-run folders keep them; a resume or a later evaluate()
    appends as before."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from llmcore.train.reporting import set_aside_earlier_logs

    logs = tmp_path / "out" / "logs"
    runs = []
    for _ in range(2):
        trainer = Trainer(tiny(0), config(tmp_path, max_steps=3, report_to="tensorboard"), factory(4))
        trainer.train()
        runs.append(trainer)
    lines = lambda path: [json.loads(line) for line in path.read_text().splitlines()]  # noqa: E731
    assert lines(logs / "train_log.jsonl") == runs[1].log_history
    assert lines(logs / "earlier-run-1" / "train_log.jsonl") == runs[0].log_history
    for folder in (logs, logs / "earlier-run-1"):
        events = EventAccumulator(str(folder))
        events.Reload()
        assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3], folder
    runs[1].eval_batches = factory(2)(0)
    runs[1].log({"step": 3, **runs[1].evaluate()})
    assert lines(logs / "train_log.jsonl") == runs[1].log_history  # (appended: the same run)
    # (the probes of this change:) a Trainer that logs before train() is a new run too; a second train() starts over,
    # its log apart (it appended: two records a step), with no best metric from an evaluation before it (a stale
    # one was taken at its save of that step); a resume from another folder's checkpoint starts a new run here (it
    # cut this folder's earlier log at the resumed step); one through a link to output_dir continues its run
    third = Trainer(tiny(0), config(tmp_path, max_steps=3, report_to="none", save_strategy="steps", save_steps=3,
                                    metric_for_best_model="loss"), factory(4), eval_batches=factory(2)(0))
    third.log({"step": 0, **third.evaluate()})
    assert lines(logs / "earlier-run-2" / "train_log.jsonl") == runs[1].log_history
    assert third.train()["train_loss"] > 0
    third.evaluate()
    third.train()
    assert third.global_step == 3 and third.best_metric is None
    # (each run's last record: its summary, train_runtime and the rest, as transformers' Trainer logs at its end)
    assert [r["step"] for r in lines(logs / "earlier-run-3" / "train_log.jsonl")] == [0, 1, 2, 3, 3]
    assert lines(logs / "train_log.jsonl") == third.log_history
    other = tmp_path / "other"
    Trainer(tiny(0), config(tmp_path, output_dir=str(other), max_steps=4, save_strategy="steps", save_steps=2,
                            report_to="none"), factory(4)).train()
    Trainer(tiny(0), config(tmp_path, max_steps=4, report_to="none", save_strategy="steps", save_steps=4,
                            resume_from_checkpoint=str(other / "checkpoint-2")), factory(4)).train()
    assert [r["step"] for r in lines(logs / "train_log.jsonl")] == [3, 4, 4]
    assert lines(logs / "earlier-run-4" / "train_log.jsonl") == third.log_history
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "out")
    Trainer(tiny(0), config(tmp_path, output_dir=str(link), max_steps=5, report_to="none",
                            resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4")), factory(4)).train()
    # (the resume at step 4 drops the summary the run it continues logged at step 4, after that checkpoint)
    assert [r["step"] for r in lines(logs / "train_log.jsonl")] == [3, 4, 5, 5]
    assert not (logs / "earlier-run-5").exists()
    (logs / "train_log.jsonl").unlink()
    assert set_aside_earlier_logs(str(logs)) is None  # (only event files left: a user's writer's, maybe)
    from llmcore.train.finetune import earlier_run  # (--overwrite-output-dir removes the set-aside logs too)
    assert "logs/earlier-run-1" in earlier_run(str(tmp_path / "out"), str(logs))


def test_steps_evaluations_carry_the_epoch_and_an_early_stop_logs_its_last_steps(tmp_path):
    """Found by the same probe: evaluations of eval_strategy='steps' had no epoch (transformers' records all do), an
    early stop off the logging grid left its last steps' loss out of the log (the README says they are not), and
    an evaluation record's epoch was tagged eval/epoch in TensorBoard (transformers: train/epoch)."""
    from llmcore.train.reporting import _tag

    trainer = Trainer(tiny(0), config(tmp_path, max_steps=12, logging_steps=5, eval_strategy="steps", eval_steps=2,
                                      metric_for_best_model="loss", early_stopping_patience=2,
                                      early_stopping_threshold=1e9), factory(4), eval_batches=factory(2)(0))
    trainer.train()
    assert trainer.global_step == 6  # (evaluations at 2, 4, 6: none beats the first by 1e9)
    evals = [r for r in trainer.log_history if "eval_loss" in r]
    assert [(r["step"], r["epoch"]) for r in evals] == [(2, 0.5), (4, 1.0), (6, 1.5)]
    assert [r["step"] for r in trainer.log_history if "loss" in r] == [5, 6]
    assert (_tag("epoch"), _tag("eval_loss"), _tag("test_accuracy")) == ("train/epoch", "eval/loss", "test/accuracy")
    # the epoch strategy's early stop too (found by the probe of this change)
    trainer = Trainer(tiny(0), config(tmp_path, output_dir=str(tmp_path / "e"), max_steps=40, logging_steps=5,
                                      eval_strategy="epoch", metric_for_best_model="loss", early_stopping_patience=1,
                                      early_stopping_threshold=1e9), factory(3), eval_batches=factory(2)(0))
    trainer.train()
    assert trainer.global_step == 6 and [r["step"] for r in trainer.log_history if "loss" in r] == [5, 6]
