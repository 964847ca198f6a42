"""`llmcore bench train-step`: the steps it times compute the same loss on every side (transformers, llmcore
padded, llmcore packed), for both tasks, on a small slice of the real data; and the memory probe's child runs."""
import json
import subprocess
import sys

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


def test_memory_child_reports_a_step():
    p = subprocess.run([sys.executable, "-c", "import json; from llmcore.bench import train_step; "
                        "print(json.dumps(train_step._memory_child('causal-lm', 'fp32', 'llmcore packed')))"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["rest_mib"] > 100 and out["step_peak_above_rest_mib"] > 0
