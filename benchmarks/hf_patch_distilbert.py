"""The guide's model through ``llmcore.hf.patch``: training steps of a DistilBERT sequence classifier at
distilbert-base-uncased's shape (random weights: the speed does not depend on them; the checkpoint is not available
offline) on the guide's batch size, 16 sequences of 128 tokens (half of them padded from token 64).

Three models from one set of weights, timed in alternating rounds (one step each per round, as
``llmcore bench train-step`` steps: fused AdamW on each), after their fp32 logits (eval mode, grad enabled, so the
patched ops run as they do in training) are checked against transformers' to 1e-4:
transformers' (sdpa), patched, and patched without the first-token last layer (the classifier's and that layer's
forwards back to transformers'). Prints per precision the median and range of the per-round ratios.

    python benchmarks/hf_patch_distilbert.py [rounds]    # default 8
"""
import copy
import statistics
import sys
import time

import torch
import transformers

import llmcore.hf
from llmcore.bench.train_step import stepper


def _ratios(a: list, b: list) -> str:
    r = [x / y for x, y in zip(a, b)]
    return f"{statistics.median(r):.3f}x ({min(r):.3f}-{max(r):.3f})"


def main(rounds: int = 8) -> None:
    torch.manual_seed(0)
    ref = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(attn_implementation="sdpa"))
    patched = llmcore.hf.patch(copy.deepcopy(ref))
    whole = llmcore.hf.patch(copy.deepcopy(ref))
    assert patched._llmcore_patched["first_token_layer"] == 1
    del whole.forward, whole.distilbert.transformer.layer[-1].forward  # transformers' forwards again
    ids = torch.randint(1000, 30000, (16, 128))
    mask = torch.ones_like(ids)
    mask[8:, 64:] = 0
    labels = torch.arange(16) % 2
    for m in (whole, patched):  # the same logits before any timing (dropout off; grad on: llmcore's training path)
        ref.eval(), m.eval()
        torch.testing.assert_close(m(input_ids=ids, attention_mask=mask).logits,
                                   ref(input_ids=ids, attention_mask=mask).logits, atol=1e-4, rtol=1e-4)
        ref.train(), m.train()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"{rounds} rounds")
    for bf16 in (False, True):
        steps = [stepper(m, {"input_ids": ids, "attention_mask": mask}, labels, bf16) for m in (ref, whole, patched)]
        for s in steps:
            s()  # warm-up
        times = [[], [], []]
        for r in range(rounds):  # (each round starts one later in the order: no side always runs after the same)
            for i in range(r, r + len(steps)):
                t0 = time.perf_counter()
                steps[i % len(steps)]()
                times[i % len(steps)].append(time.perf_counter() - t0)
        ms = ", ".join(f"{n} {statistics.median(t) * 1e3:.0f} ms" for n, t in
                       zip(("transformers", "patched without first-token", "patched"), times))
        print(f"{'bf16' if bf16 else 'fp32'}: {ms}; speed-up of patched over transformers (time ratio "
              f"transformers / patched) {_ratios(times[0], times[2])}, of the first-token layer "
              f"{_ratios(times[1], times[2])}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
