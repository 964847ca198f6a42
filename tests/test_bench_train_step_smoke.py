"""`llmcore bench train-step`: the steps it times compute the same loss on every side (transformers, transformers
after llmcore.hf.patch, llmcore padded, llmcore packed), for both tasks, on a small slice of the real data; and the
memory probe's child runs."""
import os

import pytest
import torch

from llmcore.bench.data import missing_inputs


@pytest.fixture(autouse=True)
def _needs_data_and_reference():
    reason = missing_inputs()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("transformers")


@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm"])
def test_steps_agree(task):
    from llmcore.bench import train_step

    if task == "causal-lm":
        steps, facts = train_step.make_lm_steps(batch_size=3, max_length=48)
        assert facts["tokens"] <= 3 * 48 and facts["vocab_size"] == 30522
        assert "transformers + llmcore.hf.patch" in steps
    else:
        steps, facts = train_step.make_steps(batch_size=4)
        assert "transformers + llmcore.hf.patch" in steps
    for step in steps.values():
        step.model.eval()  # no dropout: the same loss on every side
    with torch.no_grad():
        losses = {impl: float(step.forward()) for impl, step in steps.items()}
    for impl in steps:
        assert losses[impl] == pytest.approx(losses["transformers"], abs=1e-4), losses
    for step in steps.values():
        step.model.train()
        step()  # forward, backward and AdamW run, and move the weights
        step.model.eval()
    with torch.no_grad():
        after = {impl: float(step.forward()) for impl, step in steps.items()}
    assert all(after[impl] != losses[impl] for impl in steps), (losses, after)


@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm"])
def test_the_check_sees_a_side_that_computes_otherwise(task):
    """Under bf16 the loss check passed a side whose attention output was halved (classification: loss moved
    1.4e-3 of ln 2, within 2e-2) or dropped (causal LM: 1e-2 of ln V, within 0.2): a new random head's loss and a
    random LM's barely depend on the layers (a probe). The logits are compared too: the sides agree, a side with
    its attention output halved does not, in either dtype."""
    from llmcore.bench import train_step

    for dtype in ("fp32", "bf16"):
        if task == "causal-lm":
            steps, _ = train_step.make_lm_steps(batch_size=3, max_length=48, dtype=dtype)
        else:
            steps, _ = train_step.make_steps(batch_size=8, dtype=dtype)
        check = train_step.loss_check(steps, dtype)
        assert check["agree"] and set(check["logit_max_rel_diff"]) == set(steps), check
        with torch.no_grad():
            for layer in steps["llmcore packed"].model.layers:
                layer.attn.o.weight.mul_(0.5)
        check = train_step.loss_check(steps, dtype)
        assert not check["agree"] and check["logit_max_rel_diff"]["llmcore padded"] > 0.1, check


def test_memory_probe_reports_a_step(tmp_path, monkeypatch):
    """step_memory runs its child from anywhere, here from the repository's root, where `python -m` would import
    the source tree (without _C when the package is installed rather than linked) but for its care."""
    from llmcore.bench import train_step

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = train_step.step_memory("causal-lm", "fp32", impls=("llmcore packed",))["llmcore packed"]
    assert out["rest_mib"] > 100 and out["step_peak_above_rest_mib"] > 0


def test_speedup_is_the_median_of_the_paired_ratios(monkeypatch):
    """The tables say "speed-up = median of the paired per-round ratios"; it was the ratio of the medians (an
    audit). And the round robin starts each round one later in the order (it always ran them in one order)."""
    from llmcore.bench import attention, train_step

    rounds = {"transformers": [10.0, 30.0, 20.0], "llmcore packed": [9.0, 10.0, 4.0]}
    monkeypatch.setattr(train_step, "_make", lambda task: lambda dtype: ({k: lambda: None for k in rounds},
                                                                          {"sentences": 4}))
    monkeypatch.setattr(train_step, "time_round_robin", lambda steps, min_rounds, budget_s: rounds)
    monkeypatch.setattr(train_step, "loss_check", lambda steps, dtype: {"agree": True})
    row = train_step.run("fp32")["results"]["llmcore packed"]
    assert row["speedup_vs_transformers"] == 3.0  # (ratios 1.11, 3, 5; the ratio of the medians: 2.22)
    assert (row["paired_speedup_min"], row["paired_speedup_max"]) == (10 / 9, 5.0)
    assert row["round_s"] == rounds["llmcore packed"]
    calls = []
    attention.time_round_robin({n: (lambda n=n: calls.append(n)) for n in "abc"}, min_rounds=3, budget_s=0)
    assert calls[3:] == list("abc" "bca" "cab")  # (after one warm-up call each)
