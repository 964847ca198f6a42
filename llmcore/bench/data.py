"""Where the shared benchmark data lives (no torch import, for the tokenizer benchmarks)."""
from __future__ import annotations

import os


def data_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.environ.get("LLMCORE_DATA_DIR"), os.path.join(here, "..", "..", "..", "shared", "data"),
                  os.path.join(os.getcwd(), "..", "shared", "data")]
    for c in candidates:
        if c and os.path.isdir(os.path.join(c, "sst2")):
            return os.path.abspath(c)
    raise FileNotFoundError("shared data not found: set LLMCORE_DATA_DIR to the folder holding sst2/ and imdb/")
