"""Greedy generation with ``llmcore.hf.patch`` against the same model unpatched (transformers' sdpa), on the CPU.

    python benchmarks/generate.py

Random-weight GPT-2 and Llama (GQA) models of MiniLM's width (6 layers, hidden 384), batch 1 and 8, a 64-token prompt
and 64 new tokens, fp32, torch's thread count. Three sides: transformers unpatched; patched as shipped (inference calls
below ``llmcore.hf.TORCH_BELOW`` rows run transformers' own code, a decode step's among them); patched with every
threshold 0 (llmcore's ops at every size, as before the thresholds). Each side's tokens must equal the unpatched
model's before timing. The sides alternate in order round by round; reported: median seconds a generate() call and the
paired ratio unpatched / side, median (min-max) of 9 rounds (below 1: slower than unpatched), and tokens/s.
"""
import copy
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import llmcore.hf
from llmcore.bench import spread, spread_text

PROMPT, NEW, VOCAB, ROUNDS = 64, 64, 8000, 9


def model(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(n_layer=6, n_embd=384, n_head=6, vocab_size=VOCAB, n_positions=512, bos_token_id=0,
                         eos_token_id=0)
        m = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(num_hidden_layers=6, hidden_size=384, intermediate_size=1024, num_attention_heads=6,
                          num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512)
        m = LlamaForCausalLM(cfg)
    m.config._attn_implementation = "sdpa"
    return m.eval()


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; prompt {PROMPT}, {NEW} new tokens")
    print("| model | batch | unpatched s | patched s | patched, thresholds 0 s | unpatched / patched "
          "| unpatched / thresholds 0 | tokens/s unpatched, patched |")
    print("|---|---|---|---|---|---|---|---|")
    shipped = dict(llmcore.hf.TORCH_BELOW)
    zeros = dict.fromkeys(shipped, 0)
    for kind in ("gpt2", "llama"):
        base = model(kind)
        patched = llmcore.hf.patch(copy.deepcopy(base))
        for batch in (1, 8):
            ids = torch.randint(0, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))

            def generate(m, thresholds):
                llmcore.hf.TORCH_BELOW.update(thresholds)
                with torch.no_grad():
                    return m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                      min_new_tokens=NEW, do_sample=False, pad_token_id=0)

            sides = {"unpatched": lambda: generate(base, shipped), "patched": lambda: generate(patched, shipped),
                     "zeros": lambda: generate(patched, zeros)}
            want = sides["unpatched"]()
            for name, f in sides.items():
                assert torch.equal(f(), want), f"{kind} batch {batch}: {name} generated other tokens"
            times = {k: [] for k in sides}
            for r in range(ROUNDS):
                for name, f in (list(sides.items()) if r % 2 == 0 else list(sides.items())[::-1]):
                    t = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in times.items()}

            def ratio(side):
                return spread_text(spread([u / s for u, s in zip(times["unpatched"], times[side])]))

            print(f"| {kind} | {batch} | {med['unpatched']:.3f} | {med['patched']:.3f} | {med['zeros']:.3f} "
                  f"| {ratio('patched')} | {ratio('zeros')} | {batch * NEW / med['unpatched']:.0f}, "
                  f"{batch * NEW / med['patched']:.0f} |", flush=True)
    llmcore.hf.TORCH_BELOW.update(shipped)


if __name__ == "__main__":
    main()
