"""Data preparation: load, clean, de-duplicate, split, tokenize and cache as memory-mappable arrays.

    >>> from llmcore.data import prepare
    >>> ds = prepare("../shared/data/sst2", "path/to/model", max_length=128, output_dir="cache/sst2")
    >>> ds["train"].ids, ds["train"].cu_seqlens, ds["train"].labels   # int32 (total,), (n + 1,), int64 (n,)

Nothing here imports torch.
"""
from llmcore.data.batching import bucketed_batches
from llmcore.data.clean import clean_text
from llmcore.data.prepare import PreparedDataset, PreparedSplit, PrepareOptions, prepare
from llmcore.data.summary import format_summary

__all__ = ["prepare", "PreparedDataset", "PreparedSplit", "PrepareOptions", "clean_text", "format_summary",
           "bucketed_batches"]
