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


def test_memory_probe_reports_a_step(tmp_path, monkeypatch):
    """step_memory runs its child from anywhere, here from the repository's root, where `python -m` would import
    the source tree (without _C when the package is installed rather than linked) but for its care."""
    from llmcore.bench import train_step

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = train_step.step_memory("causal-lm", "fp32", impls=("llmcore packed",))["llmcore packed"]
    assert out["rest_mib"] > 100 and out["step_peak_above_rest_mib"] > 0
