"""The loop under FSDP (TrainConfig.fsdp): two gloo ranks of a sharded model follow one process, write the
checkpoints one process writes (they resume under FSDP bit for bit, and in one process), and evaluate in
lockstep."""
import dataclasses
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_train import padded, tiny
from tokenizer_refs import minilm_dir

from llmcore.bench.data import data_dir
from llmcore.cli import main
from llmcore.models import CheckpointError, EncoderForSequenceClassification
from llmcore.train import TrainConfig, Trainer

STEPS, SAVE_AT = 4, 2


def _shards(world=2):
    """Per micro-batch, one uneven shard per rank (2 + 5 examples, then 4 + 1, ...; 4 ranks: 2 + 5 + 1 + 3, ...)."""
    gen = torch.Generator().manual_seed(11)
    sizes = [(2, 5, 1, 3), (4, 1, 2, 2), (3, 3, 5, 1), (1, 6, 2, 4), (5, 2, 3, 1), (2, 2, 1, 1), (3, 4, 4, 2),
             (6, 1, 2, 3)]
    return [tuple(padded(gen, n) for n in row[:world]) for row in sizes]


def _eval_batches():
    gen = torch.Generator().manual_seed(12)
    return [padded(gen, n, length=5) for n in (3, 2, 4, 5)]


def _config(out_dir, **kw):
    # max_grad_norm small enough that every step clips: the norm over the shards must be the whole one
    settings = {"max_steps": STEPS, "warmup_steps": 1, "learning_rate": 1e-3, "logging_steps": 1,
                "save_strategy": "steps", "save_steps": SAVE_AT, "gradient_accumulation_steps": 2,
                "max_grad_norm": 0.05, "report_to": "none", "disable_tqdm": True}
    return TrainConfig(str(out_dir), **{**settings, **kw})


def _worker(rank, world, init_file, out_dir, mode):
    import torch.distributed as dist

    from llmcore.train.fsdp import full_model_state, is_sharded, load_optimizer_state

    torch.set_num_threads(1)
    os.environ["LOCAL_WORLD_SIZE"] = "2"  # hybrid sharding: groups of 2 ranks ("nodes"), a replica each
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    report = {}
    try:
        mine = [b[rank] for b in _shards(world)]
        # hybrid_shard also recomputes its layers (activation checkpointing of units resharded after forward)
        trainer = Trainer(tiny(0, dropout=0.0), _config(out_dir, fsdp=mode,
                                                        activation_checkpointing=mode == "hybrid_shard"), mine)
        report["sharded"] = is_sharded(trainer.model)
        weight = trainer.model.layers[0].attn.q.weight
        report["mesh"] = list(weight.device_mesh.shape)
        report["local_rows"] = weight.to_local().shape[0]
        report["train"] = trainer.train()
        report["grad_norms"] = [r["grad_norm"] for r in trainer.log_history if "grad_norm" in r]
        # rank 0 evaluates 5 - world batches, the others one each: they repeat theirs, uncounted
        evals = _eval_batches()
        trainer.eval_batches = evals[:len(evals) - world + 1] if rank == 0 else [evals[len(evals) - world + rank]]
        report["eval"] = trainer.evaluate()
        stepped = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        report["shards_after_eval"] = all(id(p) in stepped for p in trainer.model.parameters())
        # a rank without evaluation rows runs rank 0's first batch, uncounted (it raised: a probe found a 1-row
        # test split failed a finetune run after training, its model unsaved)
        trainer.eval_batches = evals if rank == 0 else []
        report["eval_on_rank_0"] = trainer.evaluate()
        report["training_after_eval"] = trainer.model.training
        try:  # an optimizer state of another model
            load_optimizer_state(trainer.model, trainer.optimizer, {"state": {}, "param_groups": [{"params": [0]}]})
        except ValueError as e:
            report["other_optimizer_state"] = str(e)
        trainer.save_model(os.path.join(out_dir, "final"))
        straight = full_model_state(trainer.model)
        # resumed from the middle by a model of another initialization: the same weights at the end
        again = Trainer(tiny(7, dropout=0.0), _config(out_dir, fsdp=mode, save_strategy="no",
                                                      resume_from_checkpoint=os.path.join(out_dir, f"checkpoint-"
                                                                                                   f"{SAVE_AT}")), mine)
        report["resumed"] = again.train()
        resumed = full_model_state(again.model)
        if rank == 0:
            report["resumed_equal"] = sorted(k for k in straight if torch.equal(straight[k], resumed[k]))
            report["keys"] = sorted(straight)
            with open(os.path.join(out_dir, "report.json"), "w") as f:
                json.dump(report, f)
    finally:
        dist.destroy_process_group()


def _merged(world=2):
    """All ranks' shards of each micro-batch as one batch: what one process sees."""
    return [{k: torch.cat([shard[k] for shard in shards]) for k in shards[0]} for shards in _shards(world)]


def _single(out_dir, world=2, **kw):
    trainer = Trainer(tiny(0, dropout=0.0), _config(out_dir, **kw), _merged(world))
    trainer.train()
    return trainer


def _resumes_in_one_process(checkpoint, single, out_dir, world=2):
    """One process resumed from ``checkpoint`` (another initialization) ends where ``single`` ended."""
    cross = Trainer(tiny(7, dropout=0.0), _config(out_dir, save_strategy="no", resume_from_checkpoint=str(checkpoint)),
                    _merged(world))
    cross.train()
    for name, t in single.model.state_dict().items():
        torch.testing.assert_close(cross.model.state_dict()[name], t, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode, world, mesh", [("full_shard", 2, [2]), ("shard_grad_op", 2, [2]),
                                               ("hybrid_shard", 4, [2, 2]), ("hybrid_shard_zero2", 4, [2, 2])])
def test_fsdp_ranks_match_one_process(tmp_path, mode, world, mesh):
    import torch.multiprocessing as mp

    # one process seeing all shards of each micro-batch at once takes the same steps
    single = _single(tmp_path / "one", world)
    out = tmp_path / "fsdp"
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(out), mode), nprocs=world, join=True)
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report["sharded"] and report["train"]["global_step"] == STEPS
    # sharded in two (hybrid: within each group of 2 ranks, replicated across the 2 groups)
    assert report["mesh"] == mesh and report["local_rows"] == 32 // 2
    # the gradients' scale (the clip binds every step and Adam is scale-free: only the norm before the clip shows it)
    norms = [r["grad_norm"] for r in single.log_history if "grad_norm" in r]
    assert len(norms) == STEPS and min(norms) > 0.05
    torch.testing.assert_close(torch.tensor(report["grad_norms"]), torch.tensor(norms), rtol=1e-4, atol=0)
    ours = load_file(out / "final" / "model.safetensors")
    theirs = load_file(tmp_path / "one" / f"checkpoint-{STEPS}" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)
    # the same checkpoint files: whole tensors, the optimizer's parameters numbered as one process numbers them
    for step in (SAVE_AT, STEPS):
        a = torch.load(out / f"checkpoint-{step}" / "optimizer.pt", weights_only=True)
        b = torch.load(tmp_path / "one" / f"checkpoint-{step}" / "optimizer.pt", weights_only=True)
        assert [g["params"] for g in a["param_groups"]] == [g["params"] for g in b["param_groups"]]
        assert a["state"].keys() == b["state"].keys()
        for i, state in b["state"].items():
            for key, t in state.items():
                torch.testing.assert_close(a["state"][i][key], t, rtol=1e-4, atol=1e-6, msg=f"{step} {i} {key}")
        assert os.path.isfile(out / f"checkpoint-{step}" / f"rng_state_{world - 1}.pt")
    # resumed from the middle under FSDP: bit for bit the straight run
    assert report["resumed"]["global_step"] == STEPS and report["resumed_equal"] == report["keys"]
    # evaluation in lockstep counts each rank's batches once: what one process gets over all of them
    single.eval_batches = _eval_batches()
    expected = single.evaluate()
    assert report["eval"]["eval_examples"] == expected["eval_examples"] == 14
    for key in ("eval_loss", "eval_accuracy", "eval_f1"):
        assert report["eval"][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert report["training_after_eval"]
    assert report["eval_on_rank_0"]["eval_examples"] == 14
    for key in ("eval_loss", "eval_accuracy", "eval_f1"):
        assert report["eval_on_rank_0"][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert report["shards_after_eval"]  # the model's parameters are the optimizer's shards again
    assert "has 1 parameters in 1 groups; the optimizer has" in report["other_optimizer_state"]
    # an FSDP checkpoint resumes in one process
    _resumes_in_one_process(out / f"checkpoint-{SAVE_AT}", single, tmp_path / "cross", world)


def _bf16_worker(rank, world, init_file, out_dir):
    """The same bf16 autocast training replicated (DDP) and sharded (FSDP, whose mixed precision gathers bf16
    parameters) in one process group."""
    import torch.distributed as dist

    from llmcore.train.fsdp import full_model_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mine = [b[rank] for b in _shards()]
        states, seen = {}, {}
        for name, mode in (("ddp", ""), ("fsdp", "full_shard")):
            trainer = Trainer(tiny(0, dropout=0.0), _config(os.path.join(out_dir, name), fsdp=mode, bf16=True,
                                                            save_strategy="no"), mine)
            if mode:  # the dtypes the layers compute with, and the ones the optimizer steps
                # runs after FSDP's own pre-forward hook (registered first), which gathers the root's parameters
                def record(module, args, kwargs):
                    seen.setdefault("gathered", str(next(module.parameters()).dtype))

                trainer.model.register_forward_pre_hook(record, with_kwargs=True)
            trainer.train()
            seen[f"{name}_grad_norms"] = [r["grad_norm"] for r in trainer.log_history if "grad_norm" in r]
            if mode:
                seen["shards"] = sorted({str(p.dtype) for p in trainer.model.parameters()})
                seen["adam"] = sorted({str(t.dtype) for st in trainer.optimizer.state.values() for t in st.values()
                                       if t.dim() > 0})
            states[name] = full_model_state(trainer.model) if mode else trainer.model.state_dict()
        if rank == 0:
            torch.save({"states": states, "seen": seen}, os.path.join(out_dir, "states.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp_bf16_gathers_bf16_and_follows_ddp(tmp_path):
    """Under bf16, FSDP gathers bf16 copies of fp32 shards and steps the shards in fp32: the run follows DDP's
    bf16 autocast run (which computes on bf16 casts of fp32 weights too) within bf16 rounding."""
    import torch.multiprocessing as mp

    mp.spawn(_bf16_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    saved = torch.load(tmp_path / "states.pt", weights_only=True)
    states, seen = saved["states"], saved["seen"]
    assert (seen["gathered"], seen["shards"], seen["adam"]) == ("torch.bfloat16", ["torch.float32"], ["torch.float32"])
    # the gradients before the clip (which binds every step): reduced in fp32 at the scale DDP's have
    assert len(seen["ddp_grad_norms"]) == STEPS and min(seen["ddp_grad_norms"]) > 0.05
    torch.testing.assert_close(torch.tensor(seen["fsdp_grad_norms"]), torch.tensor(seen["ddp_grad_norms"]),
                               rtol=5e-3, atol=0)
    assert states["ddp"].keys() == states["fsdp"].keys()
    start = tiny(0, dropout=0.0).state_dict()
    moved = 0
    for name, t in states["ddp"].items():
        assert states["fsdp"][name].dtype == torch.float32, name
        # the update, within 10% of DDP's (rms) plus 1e-4 rms: bf16 rounding noise, the whole update of the key
        # biases (whose gradient is 0 up to rounding), and Adam's full-size steps on near-zero gradients
        ours, theirs = states["fsdp"][name] - start[name], t - start[name]
        assert (ours - theirs).norm() <= 0.1 * theirs.norm() + 1e-4 * t.numel() ** 0.5, name
        moved += not torch.equal(t, start[name])
    assert moved > len(states["ddp"]) // 2  # the runs trained


SHARDED = {"state_dict_type": "SHARDED_STATE_DICT"}


def _sharded_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from llmcore.models import EncoderConfig, EncoderForSequenceClassification
    from llmcore.train.fsdp import full_model_state, full_optimizer_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    report = {}
    try:
        mine = [b[rank] for b in _shards()]
        trainer = Trainer(tiny(0, dropout=0.0), _config(out_dir, fsdp="full_shard", fsdp_config=SHARDED), mine)
        report["train"] = trainer.train()
        trainer.save_model(os.path.join(out_dir, "final"))
        straight, straight_optimizer = full_model_state(trainer.model), full_optimizer_state(trainer.model,
                                                                                            trainer.optimizer)
        # resumed from the middle, by a model of another initialization, under the other strategy and with the
        # layers recomputed in the backward (activation checkpointing inside FSDP's units changes nothing)
        middle = os.path.join(out_dir, f"checkpoint-{SAVE_AT}")
        again = Trainer(tiny(7, dropout=0.0), _config(out_dir, fsdp="shard_grad_op", fsdp_config=SHARDED,
                                                      save_strategy="no", resume_from_checkpoint=middle,
                                                      activation_checkpointing=True), mine)
        report["resumed"] = again.train()
        resumed, resumed_optimizer = full_model_state(again.model), full_optimizer_state(again.model,
                                                                                         again.optimizer)
        # a checkpoint of another architecture (wider layers) does not load
        torch.manual_seed(0)
        wide = EncoderForSequenceClassification(EncoderConfig(vocab_size=100, hidden_size=32, num_layers=2,
                                                              num_heads=4, intermediate_size=96,
                                                              max_position_embeddings=64))
        try:
            Trainer(wide, _config(out_dir, fsdp="full_shard", save_strategy="no",
                                  resume_from_checkpoint=middle), mine).train()
        except CheckpointError as e:
            report["other_model"] = str(e)
        # a shard file cut short: the error names the read that failed (rank 0, whose own file is whole, failed with
        # an empty EOFError in DCP's gather, and its empty message was the one told: a probe)
        damaged = os.path.join(out_dir, "damaged")
        if rank == 0:
            shutil.copytree(middle, damaged)
            shard = os.path.join(damaged, "sharded", "__1_0.distcp")
            os.truncate(shard, os.path.getsize(shard) // 2)
        dist.barrier()
        try:
            Trainer(tiny(7, dropout=0.0), _config(out_dir, fsdp="full_shard", fsdp_config=SHARDED, save_strategy="no",
                                                  resume_from_checkpoint=damaged), mine).train()
        except CheckpointError as e:
            report["damaged"] = str(e)
        if rank == 0:
            report["resumed_equal"] = sorted(k for k in straight if torch.equal(straight[k], resumed[k]))
            report["keys"] = sorted(straight)
            report["optimizer_equal"] = all(
                torch.equal(t, resumed_optimizer["state"][i][key])
                for i, state in straight_optimizer["state"].items() for key, t in state.items())
            report["optimizer_tensors"] = sum(len(state) for state in straight_optimizer["state"].values())
            with open(os.path.join(out_dir, "report.json"), "w") as f:
                json.dump(report, f)
    finally:
        dist.destroy_process_group()


def test_fsdp_sharded_checkpoints(tmp_path, capsys, caplog):
    """fsdp_config's SHARDED_STATE_DICT: each rank writes its shards (torch.distributed.checkpoint), nothing is
    gathered; the checkpoint resumes under FSDP bit for bit, and in one process."""
    import torch.multiprocessing as mp

    single = _single(tmp_path / "one")
    out = tmp_path / "fsdp"
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report["train"]["global_step"] == report["resumed"]["global_step"] == STEPS
    for step in (SAVE_AT, STEPS):
        folder = out / f"checkpoint-{step}"
        # one file of shards per rank and DCP's index, in place of the whole tensors
        assert sorted(os.listdir(folder / "sharded")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert not (folder / "model.safetensors").exists() and not (folder / "optimizer.pt").exists()
        assert {"config.json", "scheduler.pt", "trainer_state.json", "rng_state_0.pt",
                "rng_state_1.pt"} <= set(os.listdir(folder))
        with open(folder / "trainer_state.json") as f:
            assert json.load(f)["config"]["fsdp_config"] == SHARDED
    # resumed from the middle under FSDP: bit for bit the straight run, weights and Adam's moments
    assert report["resumed_equal"] == report["keys"] and report["optimizer_equal"]
    assert report["optimizer_tensors"] > 2 * len(report["keys"])  # step, exp_avg, exp_avg_sq of each
    assert "does not hold this model's and optimizer's state" in report["other_model"]
    told = r"does not hold this model's and optimizer's state: RuntimeError( \(rank 1\))?: PytorchStreamReader"
    assert re.search(told, report["damaged"]), report["damaged"]
    # the final model is whole tensors, the files one process writes; it follows one process
    ours = load_file(out / "final" / "model.safetensors")
    theirs = load_file(tmp_path / "one" / f"checkpoint-{STEPS}" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)
    # the sharded checkpoint resumes in one process, without a process group (DCP reshards 2 ranks into 1)
    _resumes_in_one_process(out / f"checkpoint-{SAVE_AT}", single, tmp_path / "cross")
    # the weights alone (what load_best_model_at_end reads), into a model of one process
    from llmcore.train.checkpoint import load_model_weights

    alone, reloaded = tiny(3), tiny(4)
    load_model_weights(str(out / f"checkpoint-{STEPS}"), alone)
    load_model_weights(str(tmp_path / "one" / f"checkpoint-{STEPS}"), reloaded)
    for name, t in reloaded.state_dict().items():
        torch.testing.assert_close(alone.state_dict()[name], t, rtol=1e-4, atol=1e-5, msg=name)
    # `llmcore consolidate` writes the model of a sharded checkpoint as whole tensors: those of final/ at the end
    assert main(["consolidate", str(out / f"checkpoint-{STEPS}"), str(tmp_path / "whole")]) == 0
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    assert whole.keys() == ours.keys() and all(torch.equal(whole[k], ours[k]) for k in ours)
    with open(tmp_path / "whole" / "config.json") as f, open(out / "final" / "config.json") as g:
        assert json.load(f) == json.load(g)
    assert main(["consolidate", str(out / "final"), str(tmp_path / "whole")]) == 2
    assert "is not a sharded checkpoint" in capsys.readouterr().err
    _consolidate_keeps_or_replaces_a_model(out / f"checkpoint-{STEPS}", tmp_path / "whole", ours, capsys)
    # into a model with fewer layers, or consolidated by a config.json saying fewer: refused, naming the tensors
    # left over (a probe: DCP read the subset silently, and consolidate wrote a truncated model)
    one_layer = EncoderForSequenceClassification(dataclasses.replace(tiny().config, num_layers=1))
    with pytest.raises(CheckpointError, match=r"holds \d+ model tensor\(s\) the model has no place for \(layers\.1\."):
        load_model_weights(str(out / f"checkpoint-{STEPS}"), one_layer)
    fewer = tmp_path / "fewer"
    shutil.copytree(out / f"checkpoint-{STEPS}", fewer)
    with open(fewer / "config.json") as f:
        cfg = json.load(f)
    with open(fewer / "config.json", "w") as f:
        json.dump({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] - 1}, f)
    assert main(["consolidate", str(fewer), str(tmp_path / "truncated")]) == 2
    assert "the model has no place for" in capsys.readouterr().err
    assert not (tmp_path / "truncated" / "model.safetensors").exists()
    # a sharded folder without DCP's index
    broken = tmp_path / "broken"
    shutil.copytree(out / f"checkpoint-{SAVE_AT}", broken)
    os.remove(broken / "sharded" / ".metadata")
    with pytest.raises(CheckpointError, match="does not hold this model's and optimizer's state"):
        Trainer(tiny(7, dropout=0.0), _config(tmp_path / "cross", resume_from_checkpoint=str(broken)),
                _merged()).train()
    assert main(["consolidate", str(broken), str(tmp_path / "other")]) == 2
    assert "does not hold the model its config.json describes" in capsys.readouterr().err
    # a damaged index: the error names it; DCP's logged tracebacks of its fallbacks stay off stderr
    (broken / "sharded" / ".metadata").write_bytes(b"not a pickle")
    caplog.clear()
    assert main(["consolidate", str(broken), str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "does not hold the model its config.json describes" in err and "global metadata read failed" in err
    assert not [r for r in caplog.records if "metadata is not found" in r.getMessage()]


def test_fsdp_config(monkeypatch):
    from llmcore.train.fsdp import _shard_group_size

    assert TrainConfig("o", fsdp="hybrid_shard auto_wrap").fsdp == "hybrid_shard"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="the 4 ranks do not split into such groups"):
        _shard_group_size(4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="is not a number of ranks"):
        _shard_group_size(4)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert _shard_group_size(4) == 4  # not under torchrun: one group of all ranks
    assert TrainConfig("o").fsdp == ""
    assert TrainConfig("o", fsdp="full_shard auto_wrap").fsdp == "full_shard"
    assert TrainConfig("o", fsdp=["shard_grad_op"]).fsdp == "shard_grad_op"
    assert TrainConfig("o", fsdp=False).fsdp == ""
    with pytest.raises(ValueError, match="offload"):
        TrainConfig("o", fsdp="full_shard offload")
    with pytest.raises(ValueError, match="one sharding strategy"):
        TrainConfig("o", fsdp="full_shard shard_grad_op")
    with pytest.raises(ValueError, match="names no sharding strategy"):
        TrainConfig("o", fsdp="auto_wrap")
    with pytest.raises(TypeError, match="fsdp must be"):
        TrainConfig("o", fsdp=1)


def test_fsdp_config_state_dict_type(tmp_path):
    full = {"state_dict_type": "FULL_STATE_DICT"}
    assert TrainConfig("o").fsdp_config == full and not TrainConfig("o").sharded_checkpoints
    config = TrainConfig("o", fsdp="full_shard", fsdp_config={"fsdp_state_dict_type": "sharded_state_dict"})
    assert config.fsdp_config == SHARDED and config.sharded_checkpoints
    # as transformers takes it from the command line: JSON text, or a JSON file's path
    assert TrainConfig("o", fsdp="full_shard", fsdp_config=json.dumps(SHARDED)).fsdp_config == SHARDED
    (tmp_path / "fsdp.json").write_text(json.dumps({"fsdp_state_dict_type": "FULL_STATE_DICT"}))
    assert TrainConfig("o", fsdp="full_shard", fsdp_config=str(tmp_path / "fsdp.json")).fsdp_config == full
    with pytest.raises(ValueError, match="set fsdp too"):
        TrainConfig("o", fsdp_config=SHARDED)
    with pytest.raises(ValueError, match=r"\['backward_prefetch'\] not supported"):
        TrainConfig("o", fsdp="full_shard", fsdp_config={"backward_prefetch": "BACKWARD_PRE"})
    with pytest.raises(ValueError, match="state_dict_type must be one of"):
        TrainConfig("o", fsdp="full_shard", fsdp_config={"state_dict_type": "LOCAL_STATE_DICT"})
    with pytest.raises(ValueError, match="not valid JSON"):
        TrainConfig("o", fsdp="full_shard", fsdp_config="{state_dict_type: SHARDED_STATE_DICT}")
    with pytest.raises(ValueError, match="neither JSON text nor a readable JSON file"):
        TrainConfig("o", fsdp="full_shard", fsdp_config=str(tmp_path / "missing.json"))
    with pytest.raises(TypeError, match="fsdp_config must be"):
        TrainConfig("o", fsdp="full_shard", fsdp_config=["SHARDED_STATE_DICT"])


def test_fsdp_needs_a_process_group(tmp_path, capsys):
    with pytest.raises(ValueError, match="no process group is initialized"):
        Trainer(tiny(), TrainConfig(str(tmp_path), fsdp="full_shard"), [])
    # the command says so before it prepares data or loads the model
    out = tmp_path / "run"
    assert main(["finetune", "--data", os.path.join(data_dir(), "sst2"), "--model", minilm_dir(), "--output-dir",
                 str(out), "--fsdp", "full_shard"]) == 2
    assert "run under torchrun" in capsys.readouterr().err and not out.exists()
    assert main(["finetune", "--data", os.path.join(data_dir(), "sst2"), "--model", minilm_dir(), "--output-dir",
                 str(out), "--fsdp", "full_shard offload"]) == 2
    assert "['offload'] not supported" in capsys.readouterr().err
    assert main(["finetune", "--data", os.path.join(data_dir(), "sst2"), "--model", minilm_dir(), "--output-dir",
                 str(out), "--fsdp-config", json.dumps(SHARDED)]) == 2
    assert "set fsdp too" in capsys.readouterr().err and not out.exists()


def _lm_shards(world=2):
    """A causal LM's micro-batches, one uneven shard per rank (padded, with a mask; labels = the tokens)."""
    gen = torch.Generator().manual_seed(13)
    out = []
    for row in [(2, 3), (1, 4), (3, 2), (4, 1)]:
        shards = []
        for n in row[:world]:
            ids = torch.randint(0, 96, (n, 9), generator=gen)
            mask = torch.ones_like(ids)
            mask[0, 6:] = 0
            shards.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
        out.append(tuple(shards))
    return out


def _tiny_gpt2():
    """A random transformers GPT-2 (its LM head tied to wte) patched by llmcore.hf.patch."""
    transformers = pytest.importorskip("transformers")
    import llmcore.hf

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return llmcore.hf.patch(transformers.GPT2LMHeadModel(cfg))


def _hf_worker(rank, world, init_file, out_dir, sharded=False):
    import torch.distributed as dist

    from llmcore.train.fsdp import full_model_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    kw = {"fsdp": "full_shard", "max_grad_norm": 1.0, **({"fsdp_config": SHARDED} if sharded else {})}
    try:
        mine = [b[rank] for b in _lm_shards(world)]
        trainer = Trainer(_tiny_gpt2(), _config(out_dir, **kw), mine)
        trainer.train()
        trainer.save_model(os.path.join(out_dir, "final"))
        straight = full_model_state(trainer.model)
        again = Trainer(_tiny_gpt2(), _config(out_dir, save_strategy="no",
                                              resume_from_checkpoint=os.path.join(out_dir, f"checkpoint-{SAVE_AT}"),
                                              **kw),
                        mine)
        again.train()
        resumed = full_model_state(again.model)
        if rank == 0:
            with open(os.path.join(out_dir, "report.json"), "w") as f:
                json.dump({"resumed_equal": all(torch.equal(straight[k], resumed[k]) for k in straight),
                           "keys": sorted(straight)}, f)
    finally:
        dist.destroy_process_group()


def test_fsdp_transformers_model(tmp_path):
    """A transformers GPT-2 (patched; its head tied to wte) sharded by FSDP on two gloo ranks: the weights one
    process gets from the merged micro-batches, checkpoints written through transformers' save_pretrained,
    resumed under FSDP bit for bit, and a final folder transformers loads."""
    import torch.multiprocessing as mp

    transformers = pytest.importorskip("transformers")
    merged = [{k: torch.cat([s[k] for s in shards]) for k in shards[0]} for shards in _lm_shards()]
    single = Trainer(_tiny_gpt2(), _config(tmp_path / "one", max_grad_norm=1.0), merged)
    single.train()
    out = tmp_path / "fsdp"
    mp.spawn(_hf_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report["resumed_equal"] and "lm_head.weight" in report["keys"]
    assert (out / f"checkpoint-{SAVE_AT}" / "model.safetensors").is_file()
    back = transformers.GPT2LMHeadModel.from_pretrained(str(out / "final"))
    assert back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr()  # still tied
    for name, t in single.model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], t, rtol=1e-4, atol=1e-5, msg=name)


def _consolidate_keeps_or_replaces_a_model(checkpoint, folder, tensors, capsys):
    """`llmcore consolidate` into ``folder``, which holds the model of ``checkpoint`` (``tensors``): it wrote over
    a model already there without a word, in place (a probe). Refused now unless --overwrite-output-dir, and never
    into the checkpoint itself; with it each file is replaced whole, the earlier model's weight files the new one
    does not have are removed (transformers would load a stale shard index or .bin), other files are kept, and a
    failure midway leaves the earlier model as it was."""
    from safetensors.torch import load_file

    from llmcore.cli import main

    before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    assert main(["consolidate", str(checkpoint), str(folder)]) == 2
    assert "already holds a model (config.json, model.safetensors)" in capsys.readouterr().err
    assert main(["consolidate", str(checkpoint), str(checkpoint)]) == 2
    assert main(["consolidate", str(checkpoint), str(checkpoint / "sharded" / "x")]) == 2
    assert capsys.readouterr().err.count("is inside the checkpoint") == 2
    assert not (checkpoint / "model.safetensors").exists() and not (checkpoint / "sharded" / "x").exists()
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before
    # a full disk while writing the new model: the earlier one is untouched, no staging folder left
    (folder / "model.safetensors").write_bytes(b"an earlier model")
    before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    import safetensors.torch

    real = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    safetensors.torch.save_file = full_disk
    try:
        assert main(["consolidate", str(checkpoint), str(folder), "--overwrite-output-dir"]) == 2
    finally:
        safetensors.torch.save_file = real
    assert "No space left on device" in capsys.readouterr().err
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before
    # --overwrite-output-dir: replaced; the earlier model's other weight files removed, files not a model's kept
    for stale in ("pytorch_model.bin", "model-00001-of-00002.safetensors", "model.safetensors.index.json"):
        (folder / stale).write_bytes(b"stale")
    (folder / "tokenizer.json").write_text("{}")
    assert main(["consolidate", str(checkpoint), str(folder), "--overwrite-output-dir"]) == 0
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "tokenizer.json"]
    whole = load_file(folder / "model.safetensors")
    assert whole.keys() == tensors.keys() and all(torch.equal(whole[k], tensors[k]) for k in tensors)


def test_fsdp_sharded_transformers_model_consolidates(tmp_path):
    """A transformers GPT-2 under FSDP with SHARDED_STATE_DICT: each rank writes its shards of transformers' names,
    the run resumes from them bit for bit, and `llmcore consolidate` writes the last checkpoint's model as
    transformers' own files (it built llmcore models only, so this failed), equal to final/ and loadable."""
    import torch.multiprocessing as mp

    transformers = pytest.importorskip("transformers")
    out = tmp_path / "fsdp"
    mp.spawn(_hf_worker, args=(2, str(tmp_path / "init"), str(out), True), nprocs=2, join=True)
    with open(out / "report.json") as f:
        assert json.load(f)["resumed_equal"]
    last = out / f"checkpoint-{STEPS}"
    assert (last / "sharded" / ".metadata").is_file() and not (last / "model.safetensors").exists()
    assert main(["consolidate", str(last), str(tmp_path / "whole")]) == 0
    whole = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "whole"))
    final = transformers.GPT2LMHeadModel.from_pretrained(str(out / "final"))
    assert whole.lm_head.weight.data_ptr() == whole.transformer.wte.weight.data_ptr()  # still tied
    for name, t in final.state_dict().items():
        assert torch.equal(whole.state_dict()[name], t), name
    start = _tiny_gpt2().state_dict()
    assert sum(not torch.equal(t, start[n]) for n, t in final.state_dict().items()) > 10  # trained


def _first_token_worker(rank, world, init_file, out_file):
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import llmcore.hf

    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=80, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                      initializer_range=0.2, attn_implementation="sdpa")
        ref = transformers.BertForSequenceClassification(cfg)
        model = llmcore.hf.patch(copy.deepcopy(ref))
        shapes = []  # the first-token computations' outputs (a hook of the test's own would turn it off)
        layer, fn = model.bert.encoder.layer[-1], model.bert.encoder.layer[-1]._llmcore_first_token_fn

        def recorded(self, *args):
            out = fn(self, *args)
            shapes.append(list(out.shape))
            return out

        layer._llmcore_first_token_fn = recorded
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)  # (it renames the classes: FSDPBertForSequenceClassification)
        ids = torch.randint(0, 96, (3, 13), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        labels = torch.tensor([1, 0, 1])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump({"shapes": shapes, "loss_diff": abs(float(loss) - float(want)),
                           "cls": type(model).__name__}, f)
    finally:
        dist.destroy_process_group()


def test_fsdp2_keeps_the_first_token_layer(tmp_path):
    """hf.patch's first-token last layer under FSDP2 (fully_shard, which swaps the modules' classes): the layer
    still computes row 0 only, and the loss is transformers'."""
    import torch.multiprocessing as mp

    pytest.importorskip("transformers")
    mp.spawn(_first_token_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.json")), nprocs=2, join=True)
    with open(tmp_path / "out.json") as f:
        out = json.load(f)
    assert out["cls"].startswith("FSDP") and out["shapes"] == [[3, 1, 48]]
    assert out["loss_diff"] < 1e-5


def test_a_sharded_read_error_names_the_rank_that_failed():
    """DCP gathers every rank's failure; a rank whose own file was whole failed in the gather with an empty EOFError,
    and as the lowest rank its empty message was the one told (a probe's 2-rank run with a shard file cut short)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from llmcore.train.fsdp import _cause

    damaged = RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")
    e = CheckpointException("load failed", {0: (EOFError(), None), 1: (damaged, None)})
    assert _cause(e) == f"RuntimeError (rank 1): {damaged}"
    assert _cause(CheckpointException("x", {0: (damaged, None), 1: (damaged, None)})) == f"RuntimeError: {damaged}"
    assert _cause(CheckpointException("x", {0: (EOFError(), None)})) == "EOFError: "
